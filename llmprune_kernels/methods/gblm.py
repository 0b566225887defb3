"""GBLM-Pruner for the pipeline: Wanda's activation statistics plus a precomputed gradient-norm tensor.

Options (passed by the pipeline): ``gradient`` (the G tensor of this Linear), or ``gradients`` (a mapping
or ``GradientNorms`` keyed by full module name) together with ``layer_name``.
"""
from __future__ import annotations

from typing import Any

import torch

from llmprune_kernels.methods.base import LayerPruner, register_method
from llmprune_kernels.reference.gblm import gblm_prune_
from llmprune_kernels.reference.wanda import ActNormStats


def _lookup_gradient(options: dict[str, Any]) -> torch.Tensor:
    name = options.get("layer_name", "layer")
    if options.get("gradient") is not None:
        return options["gradient"]
    grads = options.get("gradients")
    if grads is None:
        raise ValueError(
            f"{name}: method 'gblm' needs gradient norms (option 'gradient' or 'gradients'); compute them with "
            "llmprune_kernels.gradients.collect_gradient_norms"
        )
    grads = getattr(grads, "norms", grads)
    if name not in grads:
        raise ValueError(f"{name}: no gradient norm for this layer; the gradients hold e.g. {next(iter(grads), None)!r}")
    return grads[name]


@register_method("gblm")
class GBLMPruner(LayerPruner):
    def __init__(self, layer, config, **options: Any) -> None:
        super().__init__(layer, config, **options)
        self.stats = ActNormStats(layer.in_features, device=layer.weight.device)

    def add_batch(self, inp: torch.Tensor) -> None:
        self.stats.add_batch(inp, name=self.options.get("layer_name", "activations"))

    def prune(self) -> dict[str, Any]:
        name = self.options.get("layer_name", "layer")
        if self.stats.nsamples == 0:
            raise ValueError(f"{name}: no calibration data reached this layer")
        grad = _lookup_gradient(self.options)
        gblm_prune_(self.layer.weight.data, self.stats.scaler_row, grad.to(self.layer.weight.device), self.config)
        return {}

    def free(self) -> None:
        self.stats = None
