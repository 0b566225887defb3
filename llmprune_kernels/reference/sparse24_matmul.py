"""Reference 2:4 matmul: expand the packing to the masked dense weight, then ``F.linear``.

This is the oracle for every 2:4 path (Triton decode kernel, cuSPARSELt, torch semi-structured) and the
CPU execution path of ``SparseLinear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmprune_kernels.sparse24.pack import Packed24, unpack_24


def sparse24_linear_reference(x: torch.Tensor, packed: Packed24, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W = unpack_24(packed)`` (the masked dense weight)."""
    return F.linear(x, unpack_24(packed), bias)
