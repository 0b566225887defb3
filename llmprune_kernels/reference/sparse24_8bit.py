"""Reference 8-bit 2:4 matmul: dequantise the packing in fp32 (``q * scale``), expand it to the masked dense
weight, then ``F.linear`` in fp32. The oracle of the 8-bit decode kernel (``backends.decode8``) and of the
large-M fallback that runs the 16-bit 2:4 paths on the dequantised weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmprune_kernels.sparse24.pack import unpack_24
from llmprune_kernels.sparse24.quant8 import Packed24Q8, dequantize_24


def sparse24_8bit_linear_reference(x: torch.Tensor, q: Packed24Q8, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` in fp32 with ``W[r, k] = q[r, k] * scale[r, group(k)]`` where kept, else 0."""
    w = unpack_24(dequantize_24(q, torch.float32))
    return F.linear(x.float(), w, None if bias is None else bias.float())
