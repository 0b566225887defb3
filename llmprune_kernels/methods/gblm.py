"""GBLM-Pruner for the pipeline: Wanda's activation statistics plus a precomputed gradient-norm tensor.

Gradient norms come, in this order of precedence, from the option ``gradient`` (the G tensor of this
Linear), the option ``gradients`` (a mapping or ``GradientNorms`` keyed by full module name, looked up by
``layer_name``), or ``model_info``: the pipeline calls ``prepare_model`` first, which computes them from
the calibration windows (``llmprune_kernels.pipeline.gradients``; options ``gblm_scale`` (100) and
``gblm_grad_dtype`` ("float16" as the reference, or "float32"), ``gblm_accumulate_device`` (where the
fp32 accumulator lives; default the weights' device, "cpu" keeps it off the GPU as the reference does)).
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
        grads = options.get("model_info")
    if grads is None:
        raise ValueError(
            f"{name}: method 'gblm' needs gradient norms (option 'gradient' or 'gradients'); compute them with "
            "llmprune_kernels.pipeline.gradients.collect_gradient_norms"
        )
    grads = getattr(grads, "norms", grads)
    if name not in grads:
        raise ValueError(f"{name}: no gradient norm for this layer; the gradients hold e.g. "
                         f"{next(iter(grads), None)!r}")
    return grads[name]


@register_method("gblm")
class GBLMPruner(LayerPruner):
    @classmethod
    def prepare_model(cls, model, calibration, config, device=None, options=None):
        """Gradient norms over the calibration windows (skipped when the caller passes ``gradients``).

        The backward pass needs the whole model on one device: it is moved to ``device`` for this pass
        and back afterwards.
        """
        options = options or {}
        if options.get("gradients") is not None or options.get("gradient") is not None:
            return None
        from llmprune_kernels.pipeline.gradients import collect_gradient_norms
        from llmprune_kernels.pipeline.models import parse_dtype

        home = next(model.parameters()).device
        device = torch.device(device or home)
        store = options.get("gblm_grad_dtype", "float16")
        store = parse_dtype(store) if isinstance(store, str) else store
        model.to(device)
        try:
            return collect_gradient_norms(
                model, list(calibration), scale=float(options.get("gblm_scale", 100.0)), store_dtype=store,
                accumulate_device=options.get("gblm_accumulate_device"),
                progress=bool(options.get("progress", False)),
            )
        finally:
            model.to(home)

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
