"""Reference 8-bit 2:4 matmuls, in fp32.

* ``sparse24_8bit_linear_reference``: dequantise the packing (``q * scale``), expand it to the masked dense
  weight, then ``F.linear`` in fp32. The oracle of the 8-bit decode kernel (``backends.decode8``) and of the
  large-M fallback that runs the 16-bit 2:4 paths on the dequantised weight.
* ``quantize_activations_reference`` / ``sparse24_8bit_act_linear_reference``: the same with the activations
  quantised per token to the weight's 8-bit type (``x_q = x / s`` rounded as the weights are, ``s`` from
  :func:`~llmprune_kernels.sparse24.quant8.activation_scales`), then fake-quantised back (``x_q * s``). The oracle
  of the 8-bit x 8-bit cuSPARSELt backend (``backends.cslt8``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmprune_kernels.sparse24.pack import unpack_24
from llmprune_kernels.sparse24.quant8 import QMAX, Packed24Q8, activation_scales, dequantize_24


def sparse24_8bit_linear_reference(x: torch.Tensor, q: Packed24Q8, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` in fp32 with ``W[r, k] = q[r, k] * scale[r, group(k)]`` where kept, else 0."""
    w = unpack_24(dequantize_24(q, torch.float32))
    return F.linear(x.float(), w, None if bias is None else bias.float())


def quantize_activations_reference(x: torch.Tensor, qdtype: torch.dtype, scale_dtype: torch.dtype | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_q [..., k] in qdtype, scale [..., 1] in scale_dtype)``, one scale per token (row of the last dim):
    ``x_q = x / scale`` in fp32, INT8 rounded half to even and clamped to +-127, FP8 e4m3 clamped to +-448 and
    rounded to nearest even. ``scale_dtype`` defaults to x's dtype (the dtype the output is scaled in)."""
    scale_dtype = scale_dtype or x.dtype
    s = activation_scales(x.float().abs().amax(-1), qdtype, scale_dtype).unsqueeze(-1)
    v = x.float() / s.float()
    qmax = QMAX[qdtype]
    if qdtype == torch.int8:
        return v.round().clamp(-qmax, qmax).to(torch.int8), s
    return v.clamp(-qmax, qmax).to(qdtype), s


def fake_quantize_activations_reference(x: torch.Tensor, qdtype: torch.dtype,
                                        scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` quantised per token to ``qdtype`` and dequantised again, in fp32."""
    xq, s = quantize_activations_reference(x, qdtype, scale_dtype)
    return xq.float() * s.float()


def sparse24_8bit_act_linear_reference(x: torch.Tensor, q: Packed24Q8, bias: torch.Tensor | None = None,
                                       scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``fq(x) @ W.T + bias`` in fp32: ``fq`` fake-quantises x per token to the weight's 8-bit type, ``W`` is the
    dequantised 2:4 weight (as :func:`sparse24_8bit_linear_reference`)."""
    w = unpack_24(dequantize_24(q, torch.float32))
    xf = fake_quantize_activations_reference(x, q.values.dtype, scale_dtype)
    return F.linear(xf, w, None if bias is None else bias.float())
