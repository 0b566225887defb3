"""Triton helpers shared by the score-and-mask kernels: the score, its order-preserving key, row reductions.

Every selection kernel (hist, radix, N:M) must compute the same fp32 score as the reference and order it
as ``torch.sort`` does, so these pieces live once here. Importing this module without Triton only sets
``HAS_TRITON = False``.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the CPU torch wheel does not bring Triton: reference paths only
    HAS_TRITON = False

if HAS_TRITON:

    @triton.jit
    def _score(w_ptr, g_ptr, f_ptr, cs_ptr, rs, w_off, g_off, col, valid, MODE: tl.constexpr, GPROMO: tl.constexpr):
        """fp32 score, bit-identical to the reference (fp-fusion is disabled at launch, so no FMA)."""
        a = tl.abs(tl.load(w_ptr + w_off, mask=valid, other=0.0).to(tl.float32))
        f = tl.load(f_ptr + col, mask=valid, other=0.0)
        if MODE == 2:  # RIA: |W|/colsum + |W|/rowsum, IEEE division as torch
            cs = tl.load(cs_ptr + col, mask=valid, other=1.0)
            s = (tl.math.div_rn(a, cs) + tl.math.div_rn(a, rs)) * f
        else:
            s = a * f
            if MODE == 1:  # GBLM: + |W|*|G| in torch's promoted dtype of (W, G), then fp32
                g = tl.abs(tl.load(g_ptr + g_off, mask=valid, other=0.0))
                if GPROMO == 3:
                    gt = (a.to(tl.float64) * g.to(tl.float64)).to(tl.float32)
                elif GPROMO == 1:  # fp16 x fp16 is exact in fp32, then one rounding as torch's half op
                    gt = (a * g.to(tl.float32)).to(tl.float16).to(tl.float32)
                elif GPROMO == 2:
                    gt = (a * g.to(tl.float32)).to(tl.bfloat16).to(tl.float32)
                else:
                    gt = a * g.to(tl.float32)
                s = s + gt
        return s

    @triton.jit
    def _keys(s, valid):
        """Order-preserving int32 keys: -0.0 == +0.0 and every NaN is the largest, as torch.sort."""
        b = s.to(tl.int32, bitcast=True)
        k = b ^ ((b >> 31) & 0x7FFFFFFF)
        k = tl.where(s == 0.0, 0, k)
        k = tl.where(s != s, 0x7FFFFFFF, k)
        return tl.where(valid, k, 0x7FFFFFFF)  # padding is never below any candidate

    @triton.jit
    def _tile_keys(w_ptr, g_ptr, f_ptr, cs_ptr, rs_ptr, rows, col, valid, n_rows, stride_w, stride_g,
                   MODE: tl.constexpr, GPROMO: tl.constexpr):
        """(rs, keys) of a tile of whole rows: RIA's row sums (1.0 in the other modes) and the scores' keys."""
        if MODE == 2:
            rs = tl.load(rs_ptr + rows, mask=rows < n_rows, other=1.0)
        else:
            rs = 1.0
        s = _score(w_ptr, g_ptr, f_ptr, cs_ptr, rs, rows * stride_w + col, rows * stride_g + col, col, valid,
                   MODE, GPROMO)
        return rs, _keys(s, valid)

    @triton.jit
    def _tsum(x):
        """Per-row sum of a [W, R, C] tile: C across a warp's lanes, W in registers (or across a few warps)."""
        return tl.sum(tl.sum(x, axis=2), axis=0)

    @triton.jit
    def _row_excl_scan(x):
        """Exclusive prefix sum of a [W, R, C] int tile along each row, in column order (w, c)."""
        tot = tl.sum(x, axis=2)
        off = tl.cumsum(tot, axis=0) - tot
        return tl.cumsum(x, axis=2) - x + off[:, :, None]

    @triton.jit
    def _write(prune, col, valid, row, w_ptr, stride_w, mask_ptr, stride_m, bits_ptr, stride_b, c0, n_bytes,
               BLOCK: tl.constexpr, WRITE_MASK: tl.constexpr, WRITE_BITS: tl.constexpr, ZERO_W: tl.constexpr):
        """Outputs of one [BLOCK] slice of a row: bool mask, packed bits (bit i of byte b = column 8b+i), zeroed W."""
        if WRITE_MASK:
            tl.store(mask_ptr + row * stride_m + col, prune.to(tl.uint8), mask=valid)
        if WRITE_BITS:  # the block starts at column c0, a multiple of 8
            bits = tl.reshape(prune.to(tl.int32) << (col % 8), [BLOCK // 8, 8])
            byte = tl.sum(bits, axis=1)
            bcol = c0 // 8 + tl.arange(0, BLOCK // 8)
            tl.store(bits_ptr + row * stride_b + bcol, byte.to(tl.uint8), mask=bcol < n_bytes)
        if ZERO_W:
            tl.store(w_ptr + row * stride_w + col, tl.zeros([BLOCK], dtype=w_ptr.dtype.element_ty), mask=prune)
