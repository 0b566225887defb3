"""Magnitude pruner for the pipeline (needs no calibration data)."""
from __future__ import annotations

from typing import Any

import torch

from llmprune_kernels.methods.base import LayerPruner, register_method
from llmprune_kernels.reference.magnitude import magnitude_prune_


@register_method("magnitude")
class MagnitudePruner(LayerPruner):
    needs_calibration = False

    def add_batch(self, inp: torch.Tensor) -> None:
        pass

    def prune(self) -> dict[str, Any]:
        magnitude_prune_(self.layer.weight.data, self.config)
        return {}
