"""Wanda pruner for the pipeline: activation-norm statistics, then per-row scoring and masking."""
from __future__ import annotations

from typing import Any

import torch

from llmprune_kernels.methods.base import LayerPruner, register_method
from llmprune_kernels.reference.wanda import ActNormStats, wanda_prune_


@register_method("wanda")
class WandaPruner(LayerPruner):
    def __init__(self, layer, config, **options: Any) -> None:
        super().__init__(layer, config, **options)
        self.stats = ActNormStats(layer.in_features, device=layer.weight.device)

    def add_batch(self, inp: torch.Tensor) -> None:
        self.stats.add_batch(inp, name=self.options.get("layer_name", "activations"))

    def prune(self) -> dict[str, Any]:
        if self.stats.nsamples == 0:
            raise ValueError(f"{self.options.get('layer_name', 'layer')}: no calibration data reached this layer")
        wanda_prune_(self.layer.weight.data, self.stats.scaler_row, self.config)
        return {}

    def free(self) -> None:
        self.stats = None
