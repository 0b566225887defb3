"""N:M score-and-mask kernel: prune the N lowest-scored of every M consecutive input columns, in one pass.

Each element's rank inside its group (smaller key, or equal key and lower column, counts) is computed
with M compares on a [rows, groups, M] tile, so the tie rule matches the reference's stable sort and
no selection loop is needed: the kernel runs at about the cost of a copy of the same bytes.
"""
from __future__ import annotations

from llmprune_kernels.ops.score_mask_common import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from llmprune_kernels.ops.score_mask_common import _keys, _score

    @triton.jit
    def _nm_kernel(w_ptr, g_ptr, f_ptr, cs_ptr, rs_ptr, mask_ptr, bits_ptr,
                   n_rows, n_cols, stride_w, stride_g, stride_m, stride_b,
                   N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr,
                   MODE: tl.constexpr, GPROMO: tl.constexpr,
                   WRITE_MASK: tl.constexpr, WRITE_BITS: tl.constexpr, ZERO_W: tl.constexpr):
        """N:M on a [BR rows, BG groups, MP lanes] tile: prune the elements of rank < N within their group."""
        r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)[:, None, None]
        lane = tl.arange(0, MP)[None, None, :]
        col = (tl.program_id(1) * BG + tl.arange(0, BG))[None, :, None] * M + lane
        valid = (r < n_rows) & (lane < M) & (col < n_cols)
        if MODE == 2:
            rs = tl.load(rs_ptr + r, mask=r < n_rows, other=1.0)
        else:
            rs = 1.0
        key = _keys(_score(w_ptr, g_ptr, f_ptr, cs_ptr, rs, r * stride_w + col, r * stride_g + col, col, valid,
                           MODE, GPROMO), valid)
        rank = tl.zeros([BR, BG, MP], dtype=tl.int32)
        for i in tl.static_range(M):
            ki = tl.sum(tl.where(lane == i, key, 0), axis=2)[:, :, None]
            rank += ((ki < key) | ((ki == key) & (lane > i))).to(tl.int32)
        prune = valid & (rank < N)
        if WRITE_MASK:
            tl.store(mask_ptr + r * stride_m + col, prune.to(tl.uint8), mask=valid)
        if WRITE_BITS:  # only launched with MP == M and BG * M a multiple of 8
            bits = tl.reshape(prune.to(tl.int32) << (col % 8), [BR, BG * M // 8, 8])
            byte = tl.sum(bits, axis=2)
            r2 = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)[:, None]
            b2 = (tl.program_id(1) * (BG * M // 8) + tl.arange(0, BG * M // 8))[None, :]
            tl.store(bits_ptr + r2 * stride_b + b2, byte.to(tl.uint8), mask=(r2 < n_rows) & (b2 < (n_cols + 7) // 8))
        if ZERO_W:
            tl.store(w_ptr + r * stride_w + col, tl.zeros([BR, BG, MP], dtype=w_ptr.dtype.element_ty), mask=prune)
