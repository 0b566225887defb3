"""Exact per-row top-k by bitwise radix select: ``select="radix1"``, and the chunked kernel for every select.

The default unstructured select is now ``score_mask_hist`` (2-4x faster on the H100); the chunked kernel
here still streams rows longer than ``MAX_BLOCK`` columns whatever the select.

The k-th smallest order-preserving key t of a row is found bit by bit, most significant first (bit b is
set when fewer than k keys lie below the candidate with it set); then every key < t is pruned, plus the
first (k - count(< t)) keys == t in column order, which is "stable ascending sort, prune the first k".
``_rows_kernel`` keeps a row in registers (rows up to ``MAX_BLOCK`` columns, H100-tuned launch in
score_mask.py); ``_row_topk_chunked_kernel`` streams longer rows chunk by chunk with the same search.
"""
from __future__ import annotations

from llmprune_kernels.ops.score_mask_common import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from llmprune_kernels.ops.score_mask_common import _keys, _row_excl_scan, _score, _tile_keys, _tsum, _write

    @triton.jit
    def _tile_select(key, valid, k, sp, R: tl.constexpr, CAP: tl.constexpr, FLOAT: tl.constexpr,
                     DIGIT: tl.constexpr, PAIR: tl.constexpr):
        """Per row of a [W, R, C] key tile: (t, count(key < t)) for the k-th smallest key t.

        Radix select, most significant bit first: bit b of t is set when fewer than k keys lie below the
        candidate with it set (DIGIT=2: two bits per step from three independent counts, halving the chain
        of dependent reductions). Bits 31..16 on the whole row; then the keys of the 16-bit bucket
        [t, t+65535] are compacted into scratch (``sp``: CAP int32 per row) and the k-th is found among them
        alone (PAIR: by ranking all pairs; else bits 15..0 by the same search), or on the whole row again
        when a bucket overflows (e.g. rows full of ties).
        FLOAT: the keys are compared as fp32 (rows of finite, non-negative, non-subnormal scores, where float
        order is key order even with denormals flushed): the FP32 pipe is twice as wide as INT32 on H100.
        Candidates are clamped into [smallest normal, +inf], which leaves every count unchanged there.
        """
        if FLOAT:
            vals = key.to(tl.float32, bitcast=True)
            t = tl.zeros([R], tl.int32)  # no key is negative: bit 31 is 0
            cnt = tl.zeros([R], tl.int32)
        else:
            vals = key
            c = _tsum((vals < 0).to(tl.int32))
            t = tl.where(c < k, 0, -2147483647 - 1)
            cnt = tl.where(c < k, c, 0)
        if DIGIT == 2:  # bit 30 alone, then bits 29..16 two at a time: 3 independent counts per step
            cand = t + (1 << 30)
            if FLOAT:
                cf = tl.minimum(tl.maximum(cand, 0x00800000), 0x7F800000).to(tl.float32, bitcast=True)
                c = _tsum(tl.where(vals < cf[None, :, None], 1.0, 0.0)).to(tl.int32)
            else:
                c = _tsum((vals < cand[None, :, None]).to(tl.int32))
            t = tl.where(c < k, cand, t)
            cnt = tl.where(c < k, c, cnt)
            for i in range(7):
                step = 1 << (28 - 2 * i)
                c1d = t + step
                c2d = t + 2 * step
                c3d = t + 3 * step
                if FLOAT:
                    f1 = tl.minimum(tl.maximum(c1d, 0x00800000), 0x7F800000).to(tl.float32, bitcast=True)
                    f2 = tl.minimum(tl.maximum(c2d, 0x00800000), 0x7F800000).to(tl.float32, bitcast=True)
                    f3 = tl.minimum(tl.maximum(c3d, 0x00800000), 0x7F800000).to(tl.float32, bitcast=True)
                    c1 = _tsum(tl.where(vals < f1[None, :, None], 1.0, 0.0)).to(tl.int32)
                    c2 = _tsum(tl.where(vals < f2[None, :, None], 1.0, 0.0)).to(tl.int32)
                    c3 = _tsum(tl.where(vals < f3[None, :, None], 1.0, 0.0)).to(tl.int32)
                else:
                    c1 = _tsum((vals < c1d[None, :, None]).to(tl.int32))
                    c2 = _tsum((vals < c2d[None, :, None]).to(tl.int32))
                    c3 = _tsum((vals < c3d[None, :, None]).to(tl.int32))
                # counts grow with the candidate: the accepted ones are a prefix c1, c2, c3
                cnt = tl.where(c3 < k, c3, tl.where(c2 < k, c2, tl.where(c1 < k, c1, cnt)))
                t = t + ((c1 < k).to(tl.int32) + (c2 < k).to(tl.int32) + (c3 < k).to(tl.int32)) * step
        else:
            for i in range(15):
                cand = t + (1 << (30 - i))
                if FLOAT:
                    cf = tl.minimum(tl.maximum(cand, 0x00800000), 0x7F800000).to(tl.float32, bitcast=True)
                    c = _tsum(tl.where(vals < cf[None, :, None], 1.0, 0.0)).to(tl.int32)
                else:
                    c = _tsum((vals < cand[None, :, None]).to(tl.int32))
                t = tl.where(c < k, cand, t)  # helpers inlined: the interpreter pays ms per device-function call
                cnt = tl.where(c < k, c, cnt)
        tb = t[None, :, None]
        inb = (valid & (key >= tb) & (key <= tb + 65535)).to(tl.int32)
        nb = _tsum(inb)
        base = cnt
        if tl.max(nb, axis=0) <= CAP:  # usually a handful of keys per row
            pos = _row_excl_scan(inb)
            tl.store(sp[None, :, None] + pos, key, mask=inb != 0)
            tl.debug_barrier()  # other threads' stores must be visible before the reload
            lane = tl.arange(0, CAP)[None, :]
            buf = tl.load(sp[:, None] + lane, mask=lane < nb[:, None], other=0x7FFFFFFF, cache_modifier=".cg")
            if PAIR:  # rank every bucket key at once: less_i = #{j: buf_j < buf_i}; 3 reductions, no chain
                less = tl.zeros([R, CAP], tl.int32)
                for j0 in tl.static_range(0, CAP, 32):
                    lj = j0 + tl.arange(0, 32)[None, :]
                    bj = tl.load(sp[:, None] + lj, mask=lj < nb[:, None], other=0x7FFFFFFF, cache_modifier=".cg")
                    less += tl.sum((bj[:, None, :] < buf[:, :, None]).to(tl.int32), axis=2)
                # the k-th smallest is the largest bucket key with fewer than k keys below it
                ok = (lane < nb[:, None]) & (base[:, None] + less < k)
                t = tl.max(tl.where(ok, buf, t[:, None]), axis=1)
                cnt = base + tl.max(tl.where(ok, less, 0), axis=1)
            else:
                if FLOAT:
                    bufv = buf.to(tl.float32, bitcast=True)  # padding becomes NaN: never below a candidate
                else:
                    bufv = buf
                for i in range(16):
                    cand = t + (1 << (15 - i))
                    if FLOAT:
                        cf = tl.minimum(tl.maximum(cand, 0x00800000), 0x7F800000).to(tl.float32, bitcast=True)
                        c = base + tl.sum(tl.where(bufv < cf[:, None], 1.0, 0.0), axis=1).to(tl.int32)
                    else:
                        c = base + tl.sum((bufv < cand[:, None]).to(tl.int32), axis=1)
                    t = tl.where(c < k, cand, t)
                    cnt = tl.where(c < k, c, cnt)
        else:
            for i in range(16):
                cand = t + (1 << (15 - i))
                if FLOAT:
                    cf = tl.minimum(tl.maximum(cand, 0x00800000), 0x7F800000).to(tl.float32, bitcast=True)
                    c = _tsum(tl.where(vals < cf[None, :, None], 1.0, 0.0)).to(tl.int32)
                else:
                    c = _tsum((vals < cand[None, :, None]).to(tl.int32))
                t = tl.where(c < k, cand, t)
                cnt = tl.where(c < k, c, cnt)
        return t, cnt

    @triton.jit
    def _search_lo(vals, base, t, cnt, k, FLOAT: tl.constexpr):
        """Bits 15..0 of a 1-D search (chunked kernel): count(keys < cand) = base + count(vals < cand)."""
        for i in range(16):
            cand = t + (1 << (15 - i))
            if FLOAT:
                cf = tl.minimum(tl.maximum(cand, 0x00800000), 0x7F800000).to(tl.float32, bitcast=True)
                c = base + tl.sum(tl.where(vals < cf, 1.0, 0.0), axis=0).to(tl.int32)
            else:
                c = base + tl.sum((vals < cand).to(tl.int32), axis=0)
            t = tl.where(c < k, cand, t)
            cnt = tl.where(c < k, c, cnt)
        return t, cnt

    @triton.jit
    def _rows_kernel(w_ptr, g_ptr, f_ptr, cs_ptr, rs_ptr, mask_ptr, bits_ptr, scratch_ptr,
                     n_rows, n_cols, k, stride_w, stride_g, stride_m, stride_b,
                     MODE: tl.constexpr, GPROMO: tl.constexpr, W: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
                     CAP: tl.constexpr, WRITE_MASK: tl.constexpr, WRITE_BITS: tl.constexpr, ZERO_W: tl.constexpr,
                     FLOAT: tl.constexpr, DIGIT: tl.constexpr, PAIR: tl.constexpr):
        """Unstructured: R rows per program, each held in registers as W chunks of C columns.

        The tile is [W, R, C] so that Triton's default layout puts C across a warp's lanes and the R rows
        across warps: a row's counts then reduce within its warp(s), without block-wide barriers, which
        matters because the search is a chain of ~35 dependent reductions.
        """
        r1 = (tl.program_id(0) * R + tl.arange(0, R)).to(tl.int64)
        rows = r1[None, :, None]
        col = (tl.arange(0, W)[:, None] * C + tl.arange(0, C)[None, :])[:, None, :]
        valid = (col < n_cols) & (rows < n_rows)
        _, key = _tile_keys(w_ptr, g_ptr, f_ptr, cs_ptr, rs_ptr, rows, col, valid, n_rows, stride_w, stride_g,
                            MODE, GPROMO)
        sp = scratch_ptr + r1 * CAP
        if FLOAT:
            # float order == key order for finite non-negative normal scores (and zeros); else integer compares
            odd = valid & ((key < 0) | (key >= 0x7F800000) | ((key > 0) & (key < 0x00800000)))
            odd = tl.max(tl.max(tl.max(tl.where(odd, 1, 0), axis=2), axis=1), axis=0)
            if odd == 0:
                t, cnt = _tile_select(key, valid, k, sp, R, CAP, True, DIGIT, PAIR)
            else:  # Inf, NaN or subnormal scores in this tile
                t, cnt = _tile_select(key, valid, k, sp, R, CAP, False, DIGIT, PAIR)
        else:
            t, cnt = _tile_select(key, valid, k, sp, R, CAP, False, DIGIT, PAIR)
        tb = t[None, :, None]
        eq = (valid & (key == tb)).to(tl.int32)
        need = k - cnt  # keys == t to prune, the first ones in column order
        if tl.max(_tsum(eq) - need, axis=0) == 0:  # usual case: every key == t is pruned, no column rank needed
            prune = valid & (key <= tb)
        else:  # ties straddle the k-th (e.g. dequantized weights): rank them in column order
            rank = _row_excl_scan(eq)  # equal keys before this column
            prune = valid & ((key < tb) | ((eq != 0) & (rank < need[None, :, None])))
        if WRITE_MASK:
            tl.store(mask_ptr + rows * stride_m + col, prune.to(tl.uint8), mask=valid)
        if WRITE_BITS:  # C is a multiple of 8: each byte's 8 columns lie in one chunk
            byte = tl.sum(tl.reshape(prune.to(tl.int32) << (col % 8), [W, R, C // 8, 8]), axis=3)
            bcol = (tl.arange(0, W)[:, None] * (C // 8) + tl.arange(0, C // 8)[None, :])[:, None, :]
            tl.store(bits_ptr + rows * stride_b + bcol, byte.to(tl.uint8),
                     mask=(bcol < (n_cols + 7) // 8) & (rows < n_rows))
        if ZERO_W:
            tl.store(w_ptr + rows * stride_w + col, tl.zeros([W, R, C], dtype=w_ptr.dtype.element_ty), mask=prune)

    @triton.jit
    def _chunk_key(w_ptr, g_ptr, f_ptr, cs_ptr, rs, row, c0, n_cols, stride_w, stride_g,
                   MODE: tl.constexpr, GPROMO: tl.constexpr, CH: tl.constexpr):
        col = c0 + tl.arange(0, CH)
        valid = col < n_cols
        s = _score(w_ptr, g_ptr, f_ptr, cs_ptr, rs, row * stride_w + col, row * stride_g + col, col, valid,
                   MODE, GPROMO)
        return _keys(s, valid), col, valid

    @triton.jit
    def _row_topk_chunked_kernel(w_ptr, g_ptr, f_ptr, cs_ptr, rs_ptr, mask_ptr, bits_ptr, scratch_ptr,
                                 n_cols, k, stride_w, stride_g, stride_m, stride_b,
                                 MODE: tl.constexpr, GPROMO: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr,
                                 WRITE_MASK: tl.constexpr, WRITE_BITS: tl.constexpr, ZERO_W: tl.constexpr):
        """Unstructured for rows longer than one block: the same search, streaming the row per pass."""
        row = tl.program_id(0).to(tl.int64)
        if MODE == 2:
            rs = tl.load(rs_ptr + row)
        else:
            rs = 1.0
        # bit 31 (candidate 0), then bits 30..0; the bucket trick is used only for the low half below
        c = tl.zeros([], tl.int32)
        for c0 in range(0, n_cols, BLOCK):
            key, col, valid = _chunk_key(w_ptr, g_ptr, f_ptr, cs_ptr, rs, row, c0, n_cols, stride_w, stride_g,
                                         MODE, GPROMO, BLOCK)
            c += tl.sum((key < 0).to(tl.int32), axis=0)
        t = tl.where(c < k, 0, -2147483647 - 1)
        cnt = tl.where(c < k, c, 0)
        for i in range(15):
            cand = t + (1 << (30 - i))
            c = tl.zeros([], tl.int32)
            for c0 in range(0, n_cols, BLOCK):
                key, col, valid = _chunk_key(w_ptr, g_ptr, f_ptr, cs_ptr, rs, row, c0, n_cols, stride_w, stride_g,
                                             MODE, GPROMO, BLOCK)
                c += tl.sum((key < cand).to(tl.int32), axis=0)
            t = tl.where(c < k, cand, t)
            cnt = tl.where(c < k, c, cnt)
        # compact the 16-bit bucket into scratch (positions past CAP are dropped; then nb > CAP)
        sp = scratch_ptr + row * CAP
        nb = tl.zeros([], tl.int32)
        for c0 in range(0, n_cols, BLOCK):
            key, col, valid = _chunk_key(w_ptr, g_ptr, f_ptr, cs_ptr, rs, row, c0, n_cols, stride_w, stride_g,
                                         MODE, GPROMO, BLOCK)
            inb = valid & (key >= t) & (key <= t + 65535)
            pos = nb + tl.cumsum(inb.to(tl.int32), axis=0) - 1
            tl.store(sp + pos, key, mask=inb & (pos < CAP))
            nb += tl.sum(inb.to(tl.int32), axis=0)
        tl.debug_barrier()
        if nb <= CAP:
            lane = tl.arange(0, CAP)
            buf = tl.load(sp + lane, mask=lane < nb, other=0x7FFFFFFF, cache_modifier=".cg")
            t, cnt = _search_lo(buf, cnt, t, cnt, k, False)
        else:
            for i in range(16):
                cand = t + (1 << (15 - i))
                c = tl.zeros([], tl.int32)
                for c0 in range(0, n_cols, BLOCK):
                    key, col, valid = _chunk_key(w_ptr, g_ptr, f_ptr, cs_ptr, rs, row, c0, n_cols, stride_w,
                                                 stride_g, MODE, GPROMO, BLOCK)
                    c += tl.sum((key < cand).to(tl.int32), axis=0)
                t = tl.where(c < k, cand, t)
                cnt = tl.where(c < k, c, cnt)  # with every accepted step: the last one may be rejected
        need = k - cnt
        seen = tl.zeros([], tl.int32)  # keys == t in earlier chunks
        for c0 in range(0, n_cols, BLOCK):
            key, col, valid = _chunk_key(w_ptr, g_ptr, f_ptr, cs_ptr, rs, row, c0, n_cols, stride_w, stride_g,
                                         MODE, GPROMO, BLOCK)
            eq = (valid & (key == t)).to(tl.int32)
            rank = seen + tl.cumsum(eq, axis=0) - eq
            prune = valid & ((key < t) | ((eq != 0) & (rank < need)))
            seen += tl.sum(eq, axis=0)
            _write(prune, col, valid, row, w_ptr, stride_w, mask_ptr, stride_m, bits_ptr, stride_b,
                   c0, (n_cols + 7) // 8, BLOCK, WRITE_MASK, WRITE_BITS, ZERO_W)
