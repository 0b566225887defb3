"""Fused score-and-mask: Wanda / GBLM / RIA scores and exact per-row top-k or N:M masks in one pass.

One Triton program owns a few output rows (unstructured) or a tile of rows x groups (N:M). It reads W
(and G for GBLM) once, computes the fp32 score exactly as the reference does, maps it to an
order-preserving int32 key and selects:

* unstructured: the exact k-th smallest key t by a bitwise binary search (radix select, most significant
  bit first) - full-row counting passes for the high 16 bits, then the few keys inside the 16-bit bucket
  are compacted into a small scratch buffer and ranked pairwise (or searched bit by bit; full-row passes
  if the bucket is larger, e.g. rows full of ties). Then the tie rule: prune every key < t and the first (k - count(< t)) keys == t
  in column order (lower column index first), which is exactly "stable ascending sort, prune the first k".
* unstructured, ``select="hist8"`` (``LLMPRUNE_SCORE_MASK_SELECT=hist8``): the same k-th key t and count(< t)
  from four dependent rounds of 8-bit digits (``tl.histogram`` of the keys that match the prefix found so
  far, then a cumulative sum over the bins) instead of ~30 one-bit counting steps; rows up to
  ``HIST_MAX_BLOCK`` padded columns. Opt-in until an H100 sweep (bench ``test_select_variants``) decides.
* N:M: the rank of each element inside its group of M (smaller key, or equal key and lower index, counts).

Rows up to ``MAX_BLOCK`` columns stay in registers; longer rows are streamed in chunks (same algorithm,
W re-read from cache per pass). Cost on H100 (benchmarks/results/score_mask_h100.json): N:M runs at
1.3-1.4x of a plain copy of the same bytes; unstructured selection is bound by its chain of ~20-30
dependent per-row reductions, about 6x slower than that copy (and 6-8x faster than sort + scatter). Outputs: a bool mask, and/or packed bits (bit i of byte b = column 8b+i,
numpy ``bitorder='little'``), and/or W zeroed in place.
"""
from __future__ import annotations

import math
import os

import torch

from llmprune_kernels.reference.ria import ria_factor, ria_sums
from llmprune_kernels.validation import SparsityConfig, check_finite, check_nm, check_weight

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources

    HAS_TRITON = True
except ImportError:  # the CPU torch wheel does not bring Triton: reference paths only
    HAS_TRITON = False

# Read once, like Triton itself: kernels decorated without it cannot take CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_BLOCK = 32768  # longest row kept in registers; longer rows use the chunked kernel
CHUNK = 4096
FLOAT_COMPARE = True  # count with fp32 compares where a row's scores are finite (see _tile_select)
# Launch defaults of the in-register kernel, from the H100 sweep in benchmarks/bench_score_mask.py:
ROWS_PER_PROG = 1  # rows per program
ROW_ELEMS_PER_WARP = 2048  # a row gets one warp per this many (padded) columns: 64 keys per thread
DIGIT_BITS = 1  # radix bits per dependent step of the high-half search (2: fewer steps, 1.5x the compares)
PAIRWISE_MAX_BLOCK = 16384  # rank the bucket's keys pairwise (not 16 more search steps) up to this row width
# Selection of the in-register unstructured kernel: "radix1" = bitwise search (_rows_kernel, the H100-tuned
# default so far), "hist8" = four 8-bit-digit histogram rounds (_rows_hist_kernel). The environment variable
# lets a whole run switch without code changes; ``_tune={"select": ...}`` switches one call.
# "hist11c" = 11-bit digits, rounds after the first on the compacted top-digit bucket. "sample" = no histogram
# (tl.histogram's cost depends on the Triton version's lowering): a bracket of the k-th key from a 256/512-key
# sample and one 7-candidate counting pass, its keys compacted and ranked pairwise; radix rounds if it misses.
SELECT = os.environ.get("LLMPRUNE_SCORE_MASK_SELECT", "radix1")
if SELECT not in ("radix1", "hist8", "hist11c", "sample"):
    raise ValueError(f"LLMPRUNE_SCORE_MASK_SELECT={SELECT!r}; allowed: 'radix1', 'hist8', 'hist11c', 'sample'")
HIST_BITS = 8  # hist8: radix digit width (8: 4 rounds of 256 bins; 11: 3 rounds of 2048 bins)
HIST_ELEMS_PER_WARP = 1024  # hist8: a row gets one warp per this many (padded) columns: 32 keys per thread
HIST_MAX_BLOCK = 16384  # hist8 up to this padded width; longer rows (32768: > 128 registers, spills) keep radix1
_MODES = {"wanda": 0, "gblm": 1, "ria": 2}
_INT_MAX = 2**31 - 1

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
    def _write(prune, col, valid, row, w_ptr, stride_w, mask_ptr, stride_m, bits_ptr, stride_b, c0, n_bytes,
               BLOCK: tl.constexpr, WRITE_MASK: tl.constexpr, WRITE_BITS: tl.constexpr, ZERO_W: tl.constexpr):
        if WRITE_MASK:
            tl.store(mask_ptr + row * stride_m + col, prune.to(tl.uint8), mask=valid)
        if WRITE_BITS:  # the block starts at column c0, a multiple of 8
            bits = tl.reshape(prune.to(tl.int32) << (col % 8), [BLOCK // 8, 8])
            byte = tl.sum(bits, axis=1)
            bcol = c0 // 8 + tl.arange(0, BLOCK // 8)
            tl.store(bits_ptr + row * stride_b + bcol, byte.to(tl.uint8), mask=bcol < n_bytes)
        if ZERO_W:
            tl.store(w_ptr + row * stride_w + col, tl.zeros([BLOCK], dtype=w_ptr.dtype.element_ty), mask=prune)

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
        if MODE == 2:
            rs = tl.load(rs_ptr + rows, mask=rows < n_rows, other=1.0)
        else:
            rs = 1.0
        s = _score(w_ptr, g_ptr, f_ptr, cs_ptr, rs, rows * stride_w + col, rows * stride_g + col, col, valid,
                   MODE, GPROMO)
        key = _keys(s, valid)
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
        rank = _row_excl_scan(eq)  # equal keys before this column
        prune = valid & ((key < tb) | ((eq != 0) & (rank < (k - cnt)[None, :, None])))
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
    def _hist_rounds(key, valid, t, base, neq, k, J0: tl.constexpr, J1: tl.constexpr, R: tl.constexpr,
                     N: tl.constexpr, DB: tl.constexpr, NB: tl.constexpr):
        """Radix rounds J0..J1-1 of DB-bit digits on a [R, N] key tile: (t, base = count(< t), neq = count(== t)).

        Round j: histogram (``tl.histogram``, one per row via bin offsets r * NB) of digit j of the keys whose
        higher digits equal the prefix t found so far; a cumulative sum over the bins gives the digit of the
        k-th smallest key, the count of keys below its bin (added to base) and the count inside it (neq).
        """
        roff = (tl.arange(0, R) * NB)[:, None]
        bin_id = tl.arange(0, NB)[None, :]
        for j in tl.static_range(J0, J1):
            sh = 32 - DB * (j + 1)  # digit j = key bits [sh, sh + DB), the last digit may be shorter
            if sh < 0:
                sh = 0
            if j == 0:  # signed key >> sh, offset by half the bins, orders as the key does
                digit = (key >> sh) + (1 << (31 - sh))
                live = valid
            else:
                digit = (key >> sh) & (NB - 1)
                live = valid & ((key >> (32 - DB * j)) == (t >> (32 - DB * j))[:, None])
            h = tl.reshape(tl.histogram(tl.reshape(digit + roff, [R * N]), R * NB,
                                        mask=tl.reshape(live, [R * N])), [R, NB])
            cum = tl.cumsum(h, axis=1)
            # the k-th smallest lies in the first bin whose inclusive count reaches k (bin 0 when k = 0)
            b = tl.sum((base[:, None] + cum < k).to(tl.int32), axis=1)
            base += tl.sum(tl.where(bin_id < b[:, None], h, 0), axis=1)
            neq = tl.sum(tl.where(bin_id == b[:, None], h, 0), axis=1)
            if j == 0:
                t = (b - (1 << (31 - sh))) << sh
            else:
                t = t | (b << sh)
        return t, base, neq

    @triton.jit
    def _sample_bracket(w_ptr, g_ptr, f_ptr, cs_ptr, rs, rows, key, valid, n_rows, n_cols, k, stride_w, stride_g,
                        MODE: tl.constexpr, GPROMO: tl.constexpr, R: tl.constexpr, S: tl.constexpr, D: tl.constexpr):
        """Bracket [lo, hi) of the k-th smallest key from a sample, with exact counts, no histogram.

        S evenly spaced columns are scored again and ranked pairwise; seven candidates at sample ranks
        q + o * D (q = k * S / n_cols, o = -3..3) are counted on the whole row in one pass (independent
        reductions). lo = the largest candidate with count(< lo) < k, hi = the smallest with count(< hi) >= k
        (``nohi`` when none). Returns lo, hi, nohi, clo = count(< lo), nb = size of [lo, hi).
        """
        scol = (tl.arange(0, S)[None, :] * n_cols) // S
        svalid = (rows < n_rows) & (scol < n_cols)
        skey = _keys(_score(w_ptr, g_ptr, f_ptr, cs_ptr, rs, rows * stride_w + scol, rows * stride_g + scol, scol,
                            svalid, MODE, GPROMO), svalid)
        sless = tl.zeros([R, S], tl.int32)  # rank in the sample, 32 keys at a time (re-scored: registers)
        for j0 in tl.static_range(0, S, 32):
            jcol = ((j0 + tl.arange(0, 32)[None, :]) * n_cols) // S
            jvalid = (rows < n_rows) & (jcol < n_cols)
            jkey = _keys(_score(w_ptr, g_ptr, f_ptr, cs_ptr, rs, rows * stride_w + jcol, rows * stride_g + jcol, jcol,
                                jvalid, MODE, GPROMO), jvalid)
            sless += tl.sum((jkey[:, None, :] < skey[:, :, None]).to(tl.int32), axis=2)
        q = (k * S) // n_cols
        lo = tl.full([R], -2147483647 - 1, tl.int32)
        clo = tl.zeros([R], tl.int32)
        hi = tl.full([R], 2147483647, tl.int32)
        chi = tl.zeros([R], tl.int32) + n_cols
        nohi = tl.full([R], 1, tl.int32)
        for o in tl.static_range(-3, 4):
            c = tl.max(tl.where(sless <= q + o * D, skey, -2147483647 - 1), axis=1)
            n = tl.sum((valid & (key < c[:, None])).to(tl.int32), axis=1)
            below = n < k  # candidates grow with o: the accepted ones are a prefix, the rest a suffix
            lo = tl.where(below, c, lo)
            clo = tl.where(below, n, clo)
            first_hi = (~below) & (nohi == 1)
            hi = tl.where(first_hi, c, hi)
            chi = tl.where(first_hi, n, chi)
            nohi = tl.where(first_hi, 0, nohi)
        return lo, hi, nohi, clo, chi - clo

    @triton.jit
    def _rows_hist_kernel(w_ptr, g_ptr, f_ptr, cs_ptr, rs_ptr, mask_ptr, bits_ptr, scratch_ptr,
                          n_rows, n_cols, k, stride_w, stride_g, stride_m, stride_b,
                          MODE: tl.constexpr, GPROMO: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
                          DB: tl.constexpr, NB: tl.constexpr, NR: tl.constexpr, CAP: tl.constexpr, SAMPLE: tl.constexpr,
                          WRITE_MASK: tl.constexpr, WRITE_BITS: tl.constexpr, ZERO_W: tl.constexpr):
        """Unstructured, digit-histogram radix select: R rows per program, each row a [BLOCK] slice in registers.

        ceil(32 / DB) dependent rounds (``_hist_rounds``; 4 for DB=8, 3 for DB=11) instead of ~30 one-bit
        counting steps. CAP > 0: only round 0 runs on the whole row; the keys of the chosen top-digit bucket
        (with DB=11 about 6% of a row of Wanda scores) are compacted into scratch (CAP int32 per row) and the
        later rounds run on them alone, or on the whole row when a bucket overflows (e.g. rows of ties).
        Then t is exact, base = count(key < t), and the tie rule prunes the first (k - base) keys == t.
        """
        r1 = (tl.program_id(0) * R + tl.arange(0, R)).to(tl.int64)
        rows = r1[:, None]
        col = tl.arange(0, BLOCK)[None, :]
        valid = (col < n_cols) & (rows < n_rows)
        if MODE == 2:
            rs = tl.load(rs_ptr + rows, mask=rows < n_rows, other=1.0)
        else:
            rs = 1.0
        s = _score(w_ptr, g_ptr, f_ptr, cs_ptr, rs, rows * stride_w + col, rows * stride_g + col, col, valid,
                   MODE, GPROMO)
        key = _keys(s, valid)
        t = tl.zeros([R], tl.int32)
        base = tl.zeros([R], tl.int32)
        neq = tl.zeros([R], tl.int32)
        if SAMPLE > 0:  # "sample": bracket from a sample, exact pairwise ranking of the bracket's keys
            lo, hi, nohi, clo, nb = _sample_bracket(w_ptr, g_ptr, f_ptr, cs_ptr, rs, rows, key, valid, n_rows, n_cols,
                                                    k, stride_w, stride_g, MODE, GPROMO, R, SAMPLE, max(1, SAMPLE // 40))
            if tl.max(nb, axis=0) <= CAP:
                inb = valid & (key >= lo[:, None]) & ((key < hi[:, None]) | (nohi[:, None] == 1))
                pos = tl.cumsum(inb.to(tl.int32), axis=1) - 1
                sp = scratch_ptr + rows * CAP
                tl.store(sp + pos, key, mask=inb)
                tl.debug_barrier()  # other threads' stores must be visible before the reload
                lane = tl.arange(0, CAP)[None, :]
                buf = tl.load(sp + lane, mask=lane < nb[:, None], other=0x7FFFFFFF, cache_modifier=".cg")
                less = tl.zeros([R, CAP], tl.int32)
                for j0 in tl.static_range(0, CAP, 32):
                    lj = j0 + tl.arange(0, 32)[None, :]
                    bj = tl.load(sp + lj, mask=lj < nb[:, None], other=0x7FFFFFFF, cache_modifier=".cg")
                    less += tl.sum((bj[:, None, :] < buf[:, :, None]).to(tl.int32), axis=2)
                # the k-th smallest is the largest key with fewer than k keys below it (lo itself when k = 0)
                ok = (lane < nb[:, None]) & (clo[:, None] + less < k)
                t = tl.max(tl.where(ok, buf, lo[:, None]), axis=1)
                base = clo + tl.max(tl.where(ok, less, 0), axis=1)
                neq = tl.sum(((lane < nb[:, None]) & (buf == t[:, None])).to(tl.int32), axis=1)
            else:  # the bracket missed k or overflowed the buffer (e.g. rows of ties): radix rounds
                t, base, neq = _hist_rounds(key, valid, t, base, neq, k, 0, NR, R, BLOCK, DB, NB)
        elif CAP == 0:
            t, base, neq = _hist_rounds(key, valid, t, base, neq, k, 0, NR, R, BLOCK, DB, NB)
        else:
            t, base, neq = _hist_rounds(key, valid, t, base, neq, k, 0, 1, R, BLOCK, DB, NB)
            if tl.max(neq, axis=0) <= CAP:  # neq = the bucket's size
                inb = valid & ((key >> (32 - DB)) == (t >> (32 - DB))[:, None])
                pos = tl.cumsum(inb.to(tl.int32), axis=1) - 1
                sp = scratch_ptr + rows * CAP
                tl.store(sp + pos, key, mask=inb)
                tl.debug_barrier()  # other threads' stores must be visible before the reload
                lane = tl.arange(0, CAP)[None, :]
                bvalid = lane < neq[:, None]
                buf = tl.load(sp + lane, mask=bvalid, other=0x7FFFFFFF, cache_modifier=".cg")
                t, base, neq = _hist_rounds(buf, bvalid, t, base, neq, k, 1, NR, R, CAP, DB, NB)
            else:
                t, base, neq = _hist_rounds(key, valid, t, base, neq, k, 1, NR, R, BLOCK, DB, NB)
        tb = t[:, None]
        need = k - base
        if tl.min(tl.where(neq == need, 1, 0), axis=0) == 1:  # every key == t is pruned: no rank needed
            prune = valid & (key <= tb)
        else:
            eq = (valid & (key == tb)).to(tl.int32)
            rank = tl.cumsum(eq, axis=1) - eq  # equal keys before this column
            prune = valid & ((key < tb) | ((eq != 0) & (rank < need[:, None])))
        if WRITE_MASK:
            tl.store(mask_ptr + rows * stride_m + col, prune.to(tl.uint8), mask=valid)
        if WRITE_BITS:
            byte = tl.sum(tl.reshape(prune.to(tl.int32) << (col % 8), [R, BLOCK // 8, 8]), axis=2)
            bcol = tl.arange(0, BLOCK // 8)[None, :]
            tl.store(bits_ptr + rows * stride_b + bcol, byte.to(tl.uint8),
                     mask=(bcol < (n_cols + 7) // 8) & (rows < n_rows))
        if ZERO_W:
            tl.store(w_ptr + rows * stride_w + col, tl.zeros([R, BLOCK], dtype=w_ptr.dtype.element_ty), mask=prune)

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
            cnt = tl.where(c < k, c, cnt)
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


def triton_usable(device: torch.device | str) -> bool:
    """The kernels can run on tensors of ``device``: CUDA, or any device under ``TRITON_INTERPRET=1``."""
    return HAS_TRITON and (INTERPRET or torch.device(device).type == "cuda")


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


_PROMO = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def pack_mask_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool (rows, cols) mask to uint8 (rows, ceil(cols/8)); bit i of byte b is column 8b+i."""
    rows, cols = mask.shape
    pad = (-cols) % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).view(rows, -1, 8)
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    return (m << shifts).sum(-1, dtype=torch.uint8)


def unpack_mask_bits(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of ``pack_mask_bits``."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits[..., None] >> shifts) & 1).bool().flatten(-2)[..., :cols]


def score_and_mask(
    weight: torch.Tensor,
    act_norm_sq: torch.Tensor,
    config: SparsityConfig,
    grad: torch.Tensor | None = None,
    ria: bool = False,
    ria_alpha: float = 0.5,
    inplace: bool = False,
    mask: bool = True,
    packed: bool = False,
    check: bool = True,
    _tune: dict | None = None,
):
    """Score W (Wanda; + |W|*|G| with ``grad`` = GBLM; RIA with ``ria=True``) and select the pruned weights.

    Returns the bool mask (True = pruned), or ``(mask, bits)`` with ``packed=True`` (mask is None when
    ``mask=False``). ``inplace=True`` zeroes the pruned weights of ``weight``. Equal bit for bit to the
    reference ``mask_from_score`` of ``wanda_score`` / ``gblm_score`` / ``ria_score``. ``check=False``
    skips the NaN/Inf checks of the norms and G (each costs a device sync; G's a pass over G).
    """
    check_weight(weight)
    rows, cols = weight.shape
    if act_norm_sq.shape != (cols,):
        raise ValueError(
            f"activation norms have shape {tuple(act_norm_sq.shape)}, expected ({cols},) for weight {tuple(weight.shape)}"
        )
    if not triton_usable(weight.device):
        raise RuntimeError(
            f"the Triton score-and-mask kernel needs a CUDA tensor (or TRITON_INTERPRET=1 set before import); got "
            f"device {weight.device}, triton installed: {HAS_TRITON}. Use the reference (backend='reference')."
        )
    if grad is not None and ria:
        raise ValueError("give either grad (GBLM) or ria=True, not both")
    if check:
        check_finite(act_norm_sq, "activation norms")
    tune = _tune or {}
    dev = weight.device
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    mode, gpromo = _MODES["wanda"], 0
    g = rs = cs = w  # placeholders for pointers a mode does not read
    if grad is not None:
        if grad.shape != weight.shape:
            raise ValueError(
                f"gradient norms have shape {tuple(grad.shape)}, expected the weight's shape {tuple(weight.shape)}"
            )
        if grad.dtype not in _PROMO:
            raise TypeError(f"gradient norms have dtype {grad.dtype}; allowed: float16, bfloat16, float32, float64")
        if check:
            check_finite(grad, "gradient norms")
        g = grad.to(dev)
        g = g if g.stride(1) == 1 else g.contiguous()
        mode, gpromo = _MODES["gblm"], _PROMO[torch.promote_types(weight.dtype, grad.dtype)]
    if ria:
        mode = _MODES["ria"]
        rs, cs = ria_sums(w)
        f = ria_factor(act_norm_sq.to(dev), ria_alpha).contiguous()
    else:
        f = torch.sqrt(act_norm_sq.to(dev).float()).contiguous()  # the reference's exact fp32 factor
    if config.is_nm:
        check_nm(config.n, config.m, cols)
    # N:M packs in-kernel when a tile's width is whole bytes; otherwise pack the bool mask afterwards
    host_pack = packed and config.is_nm and not _nm_tile(config, cols, tune)[3]
    keep = mask or host_pack
    out = torch.empty(rows, cols, dtype=torch.bool, device=dev) if keep else None
    bits = torch.empty(rows, (cols + 7) // 8, dtype=torch.uint8, device=dev) if packed and not host_pack else None
    out_u8 = out.view(torch.uint8) if keep else w
    bits_arg = bits if bits is not None else out_u8
    flags = dict(MODE=mode, GPROMO=gpromo, WRITE_MASK=keep, WRITE_BITS=bits is not None, ZERO_W=inplace,
                 enable_fp_fusion=False)  # no FMA contraction: the same roundings as torch's separate ops
    if rows and cols and (keep or bits is not None or inplace):
        if config.is_nm:
            _launch_nm(w, g, f, cs, rs, out_u8, bits_arg, config, flags, tune)
        else:
            k = math.floor(cols * config.sparsity)
            _launch_rows(w, g, f, cs, rs, out_u8, bits_arg, k, flags, tune)
    elif packed and bits is None and not host_pack:
        bits = torch.zeros(rows, (cols + 7) // 8, dtype=torch.uint8, device=dev)
    if inplace and w is not weight:
        weight.copy_(w)
    if host_pack:
        bits = pack_mask_bits(out)
    result = out if mask else None
    return (result, bits) if packed else result


def _nm_tile(config: SparsityConfig, cols: int, tune: dict) -> tuple[int, int, int, bool]:
    """(MP, BG, BR, bits_in_kernel) for an N:M launch: tiles of about ``tile`` elements."""
    m = config.m
    mp = _next_pow2(m)
    groups = max(1, cols // m)
    bg = min(_next_pow2(groups), max(1, tune.get("tile_cols", 256) // mp))
    br = max(1, tune.get("tile", 1024) // (bg * mp))
    return mp, bg, br, mp == m and (bg * m) % 8 == 0


def _launch_rows(w, g, f, cs, rs, out, bits, k, flags, tune):
    rows, cols = w.shape
    max_block = tune.get("max_block", MAX_BLOCK)
    block = max(16, _next_pow2(cols))
    if block > max_block:  # stream the row in chunks
        block = min(tune.get("chunk", CHUNK), max_block)
        cap = tune.get("cap", 512)
        scratch = torch.empty(rows * cap, dtype=torch.int32, device=w.device)
        _row_topk_chunked_kernel[(rows,)](
            w, g, f, cs, rs, out, bits, scratch, cols, k, w.stride(0), g.stride(0), out.stride(0), bits.stride(0),
            BLOCK=block, CAP=cap, num_warps=tune.get("num_warps", 8), **flags)
        return
    select = tune.get("select", SELECT)
    if select in ("hist8", "hist11c", "sample") and block <= tune.get("hist_max_block", HIST_MAX_BLOCK):
        r = tune.get("rows_per_prog", 1)
        compact = select == "hist11c"
        samp = tune.get("sample", min(512, max(32, block // 16))) if select == "sample" else 0
        db = tune.get("hist_bits", 11 if compact else HIST_BITS)
        warps = max(1, min(32, r * block // tune.get("elems_per_warp", HIST_ELEMS_PER_WARP)))
        try:
            cap = tune.get("cap", block // 8 if compact else min(512, max(32, block // 16))) if compact or samp else 0
            scratch = torch.empty(triton.cdiv(rows, r) * r * max(cap, 1), dtype=torch.int32, device=w.device)
            _rows_hist_kernel[(triton.cdiv(rows, r),)](
                w, g, f, cs, rs, out, bits, scratch, rows, cols, k, w.stride(0), g.stride(0), out.stride(0),
                bits.stride(0), R=r, BLOCK=block, DB=db, NB=1 << db, NR=-(-32 // db), CAP=cap, SAMPLE=samp,
                num_warps=tune.get("num_warps", warps), **flags)
        except OutOfResources:  # as below: stream the row instead
            if "max_block" in tune:
                raise
            _launch_rows(w, g, f, cs, rs, out, bits, k, flags, {**tune, "max_block": block // 2})
        return
    c = min(block, 32 * (16 // w.element_size()))  # one warp's lanes, 16-byte loads each
    wpr = tune.get("warps_per_row", max(1, block // ROW_ELEMS_PER_WARP))
    r = tune.get("rows_per_prog", ROWS_PER_PROG)
    pair = tune.get("pair", block <= PAIRWISE_MAX_BLOCK)
    cap = tune.get("cap", (64 if block <= 4096 else 128 if block <= 16384 else 256) if pair else 128)
    cap = max(cap, 32) if pair else cap  # the pairwise ranking reads the bucket 32 keys at a time
    scratch = torch.empty(triton.cdiv(rows, r) * r * cap, dtype=torch.int32, device=w.device)
    try:
        _rows_kernel[(triton.cdiv(rows, r),)](
            w, g, f, cs, rs, out, bits, scratch, rows, cols, k, w.stride(0), g.stride(0), out.stride(0),
            bits.stride(0), W=block // c, R=r, C=c, CAP=cap, num_warps=tune.get("num_warps", r * wpr),
            FLOAT=tune.get("float", FLOAT_COMPARE), DIGIT=tune.get("digit", DIGIT_BITS), PAIR=pair, **flags)
    except OutOfResources:  # raised before anything runs (compile/launch): stream the row instead
        if "max_block" in tune:
            raise
        _launch_rows(w, g, f, cs, rs, out, bits, k, flags, {**tune, "max_block": block // 2})


def _launch_nm(w, g, f, cs, rs, out, bits, config, flags, tune):
    rows, cols = w.shape
    mp, bg, br, _ = _nm_tile(config, cols, tune)
    grid = (triton.cdiv(rows, br), triton.cdiv(cols // config.m, bg))
    _nm_kernel[grid](w, g, f, cs, rs, out, bits, rows, cols, w.stride(0), g.stride(0), out.stride(0), bits.stride(0),
                     N=config.n, M=config.m, MP=mp, BR=br, BG=bg, num_warps=tune.get("num_warps", 4), **flags)
