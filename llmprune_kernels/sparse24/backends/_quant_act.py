"""Triton per-token activation quantisation for backend ``cslt8``: scales and 8-bit codes of x in one launch.

The PyTorch form (``cslt8.quantize_per_token(..., fused=False)``) divides in fp32, rounds and clamps in separate
passes: for a [2048, 4096] fp16 x it moves ~150 MB, more than the 8-bit GEMM that follows reads. This kernel
reads x from HBM once (a second pass over a program's rows comes from L2) and writes the 8-bit codes, the zero
padding rows and the per-token scales. Each program owns BLOCK_M tokens: their largest |x|, their scales
(``_token_scale``: :func:`llmprune_kernels.sparse24.quant8.activation_scales` step for step), then their codes.

Bit for bit the PyTorch form: every rounding is IEEE (``div_rn`` divisions, fp32 products, the fp16
conversion; bf16 rounded on the bits), INT8 rounds half to even (the fp32 ``+ 1.5 * 2**23`` trick, exact for
|v| <= 127 after the clamp) and FP8 e4m3 codes are rounded to nearest even from the clamped fp32 value's bits
(``_e4m3_bits``).
"""
from __future__ import annotations

import torch

from llmprune_kernels.sparse24.backends._decode_dot import HAS_TRITON
from llmprune_kernels.sparse24.quant8 import OUT_SHIFT, QMAX

BLOCK_M, BLOCK_K = 4, 1024
RNE_SHIFT = 12582912.0  # 1.5 * 2**23: fp32 x + this - this rounds x to the nearest even integer (|x| < 2**22)

if HAS_TRITON:
    import triton
    import triton.language as tl

    _RNE = tl.constexpr(RNE_SHIFT)  # kernels read globals only as constexpr

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
        sub = ((a + _RNE) - _RNE).to(tl.uint32)
        code = tl.where(mag >= 0x3C800000, normal, sub)  # 0x3C800000: 2**-6
        return (code | ((bits >> 31) << 7)).to(tl.uint8)

    @triton.jit
    def _token_scale(a, QMAX: tl.constexpr, SCALE: tl.constexpr, TINY: tl.constexpr, SMAX: tl.constexpr):
        """``activation_scales`` for fp32 ``a`` (each token's largest |x|), as fp32 holding the scale dtype's
        value: ``a / QMAX`` rounded up, 1 for an all-zero token, clamped to [TINY, SMAX], then rounded up to
        fp16 (``SCALE`` 1) or bf16 (2); the bf16 rounding is done on the bits (ties to even)."""
        s = tl.math.div_rn(a, QMAX)
        s = tl.where(s * QMAX < a, (s.to(tl.uint32, bitcast=True) + 1).to(tl.float32, bitcast=True), s)  # next up
        s = tl.where(a > 0, s, 1.0)
        s = tl.minimum(tl.maximum(s, TINY), SMAX)
        if SCALE == 1:
            h = s.to(tl.float16)
            h = tl.where(h.to(tl.float32) < s, (h.to(tl.uint16, bitcast=True) + 1).to(tl.float16, bitcast=True), h)
            s = tl.minimum(h.to(tl.float32), SMAX)
        elif SCALE == 2:
            b = s.to(tl.uint32, bitcast=True)
            r = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            r = tl.where(r.to(tl.float32, bitcast=True) < s, r + 0x10000, r)
            s = tl.minimum(r.to(tl.float32, bitcast=True), SMAX)
        return s

    @triton.jit
    def _quant_kernel(x_ptr, q_ptr, s_ptr, M, K, ROWS, stride_xm, stride_qm,
                      FP8: tl.constexpr, QMAX: tl.constexpr, SCALE: tl.constexpr, TINY: tl.constexpr,
                      SMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """BLOCK_M tokens: their largest |x| (first pass over K), their scales, then their codes (second pass,
        from L2); zero codes for the padding rows M <= row < ROWS."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < M
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            live = row_ok[:, None] & (offs_k < K)[None, :]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=live, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        s = _token_scale(amax, QMAX, SCALE, TINY, SMAX)
        if SCALE == 2:
            tl.store(s_ptr + offs_m, (s.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16), mask=row_ok)
        else:
            tl.store(s_ptr + offs_m, s.to(s_ptr.dtype.element_ty), mask=row_ok)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            live = row_ok[:, None] & (offs_k < K)[None, :]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=live, other=0.0)
            v = tl.math.div_rn(x.to(tl.float32), s[:, None])
            v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
            if FP8:
                q = _e4m3_bits(v)
            else:
                q = ((v + _RNE) - _RNE).to(tl.int8)
            q = tl.where(live, q, tl.zeros_like(q))
            tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q,
                     mask=(offs_m < ROWS)[:, None] & (offs_k < K)[None, :])


_SCALE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def quantize_tokens(x2: torch.Tensor, qdtype: torch.dtype, scale_dtype: torch.dtype, rows: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xq [rows, k] qdtype, s [M, 1] scale_dtype)`` for ``x2 [M, k]`` in one launch: the scales of
    :func:`~llmprune_kernels.sparse24.quant8.activation_scales`, ``x2 / s`` (fp32) rounded and clamped to
    ``qdtype``, zero rows below M."""
    m, k = x2.shape
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    fp8 = qdtype == torch.float8_e4m3fn
    out = torch.empty(rows, k, device=x2.device, dtype=torch.uint8 if fp8 else torch.int8)
    code = _SCALE_CODE[scale_dtype]
    s = torch.empty(m, device=x2.device, dtype=torch.uint16 if code == 2 else scale_dtype)
    fi = torch.finfo(scale_dtype)
    grid = (triton.cdiv(rows, BLOCK_M),)
    _quant_kernel[grid](x2, out, s, m, k, rows, x2.stride(0), out.stride(0), FP8=fp8, QMAX=QMAX[qdtype],
                        SCALE=code, TINY=fi.tiny, SMAX=fi.max / OUT_SHIFT[qdtype], BLOCK_M=BLOCK_M,
                        BLOCK_K=BLOCK_K, num_warps=4)
    return (out.view(qdtype) if fp8 else out), (s.view(torch.bfloat16) if code == 2 else s).unsqueeze(1)
