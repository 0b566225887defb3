"""Triton per-token activation quantisation for backend ``cslt8``: ``xq = q8(x / s)`` in one pass over x.

The plain-PyTorch form (``cslt8.quantize_per_token_torch``) divides in fp32, rounds and clamps in separate
passes: for a [2048, 4096] fp16 x it moves ~150 MB, more than the 8-bit GEMM that follows reads. This kernel
reads each x row block once and writes the 8-bit codes (and the zero padding rows) once: x's bytes plus half
of them. Each program owns BLOCK_M tokens and BLOCK_K features; ``s`` (one fp32 per token) comes in computed
by :func:`llmprune_kernels.sparse24.quant8.activation_scales`, so scale rounding has one home.

Bit for bit the PyTorch form: the division is IEEE round-to-nearest (``div_rn``), INT8 rounds half to even
(the fp32 ``+ 1.5 * 2**23`` trick, exact for |v| <= 127 after the clamp) and FP8 e4m3 codes are rounded to
nearest even from the clamped fp32 value's bits (``_e4m3_bits``).
"""
from __future__ import annotations

import torch

from llmprune_kernels.sparse24.backends._decode_dot import HAS_TRITON

BLOCK_M, BLOCK_K = 4, 1024
RNE_SHIFT = 12582912.0  # 1.5 * 2**23: fp32 x + this - this rounds x to the nearest even integer (|x| < 2**22)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _e4m3_bits(v):
        """FP8 e4m3 codes (uint8) of fp32 ``v`` (|v| <= 448), rounded to nearest even, built from v's bits
        (the same in the interpreter as on every GPU): normals keep 3 mantissa bits, below 2**-6 the code is
        the subnormal count of 2**-9 steps (8 of them being 2**-6, exponent 1); the sign is v's sign bit."""
        bits = v.to(tl.uint32, bitcast=True)
        mag = bits & 0x7FFFFFFF
        r = (mag + 0x7FFFF + ((mag >> 20) & 1)) & 0xFFF00000  # 3 mantissa bits, ties to even
        normal = (((r >> 23) - 120) << 3) | ((r >> 20) & 7)  # exponent re-biased from 127 to 7
        a = mag.to(tl.float32, bitcast=True) * 512.0
        sub = ((a + RNE_SHIFT) - RNE_SHIFT).to(tl.uint32)
        code = tl.where(mag >= 0x3C800000, normal, sub)  # 0x3C800000: 2**-6
        return (code | ((bits >> 31) << 7)).to(tl.uint8)

    @triton.jit
    def _quant_kernel(x_ptr, s_ptr, q_ptr, M, K, ROWS, stride_xm, stride_qm,
                      FP8: tl.constexpr, QMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        in_k = (offs_k < K)[None, :]
        live = (offs_m < M)[:, None] & in_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=live, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + offs_m, mask=offs_m < M, other=1.0)
        v = tl.math.div_rn(x, s[:, None])
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        if FP8:
            q = _e4m3_bits(v)
        else:
            q = ((v + RNE_SHIFT) - RNE_SHIFT).to(tl.int8)
        q = tl.where(live, q, tl.zeros_like(q))  # padding rows (M <= row < ROWS) are zero codes
        tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q, mask=(offs_m < ROWS)[:, None] & in_k)


def quantize_rows(x2: torch.Tensor, s: torch.Tensor, qdtype: torch.dtype, qmax: float, rows: int) -> torch.Tensor:
    """``xq [rows, k]``: ``x2 [M, k] / s [M]`` (fp32) rounded and clamped to ``qdtype``, zero rows below M."""
    m, k = x2.shape
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    fp8 = qdtype == torch.float8_e4m3fn
    out = torch.empty(rows, k, device=x2.device, dtype=torch.uint8 if fp8 else torch.int8)
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(k, BLOCK_K))
    _quant_kernel[grid](x2, s.float().contiguous(), out, m, k, rows, x2.stride(0), out.stride(0),
                        FP8=fp8, QMAX=qmax, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, num_warps=4)
    return out.view(qdtype) if fp8 else out
