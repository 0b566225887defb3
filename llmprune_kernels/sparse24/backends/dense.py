"""The dense backend: ``F.linear`` on the masked dense weight, kept where no sparse path wins (and on CPU)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmprune_kernels.sparse24.backends.base import Backend
from llmprune_kernels.sparse24.pack import Packed24, expand_24, unpack_24


class DenseBackend(Backend):
    name = "dense"
    traceable = True
    differentiable = True  # F.linear's own autograd (the weight is a plain tensor that needs no gradient)

    def available(self, device: torch.device) -> bool:
        return True

    def supports(self, out_features: int, in_features: int, dtype: torch.dtype) -> bool:
        return True

    def prepare(self, packed: Packed24, config=None) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced: no data-dependent validation
            return expand_24(packed.values, packed.meta, packed.shape[1])
        return unpack_24(packed)

    def bind(self, state, config, m, in_features, out_features, bias):
        def run(x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, state, bias)
        return run

    def call(self, state, config, x, out_features, bias):
        return F.linear(x, state, bias)
