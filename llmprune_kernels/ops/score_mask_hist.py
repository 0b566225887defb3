"""Exact per-row top-k by histogram radix select: the default (``select="hist"``) unstructured kernel.

A row stays in registers as order-preserving int32 keys. The k-th smallest key t is found a digit at a
time: a level counts the keys of the current range [lo, lo + NB << s) by digit ``(key - lo) >> s`` and keeps
the bin where the cumulative count reaches k. The first level spans the row's [min, max] (256 bins), so a
second 256-bin level usually leaves a bin of one or two keys; deeper levels (ties, clusters) go on until the
bin is one key value wide. The counts are exact, so the tie count at t comes free, and when the k-th key's
bin holds only pruned keys no further pass is needed at all. Then every key < t is pruned plus the first
(k - count(< t)) keys == t in column order: "stable ascending sort, prune the first k", equal bit for bit
to ``mask_from_score``.

On CUDA the histogram lives in shared memory through a few lines of PTX (one shared atomic increment per
key and level): Triton 3.6's ``tl.histogram`` counts with warp ballots, ~100 instructions per key and
level at 256 bins, which would make this select slower than the bitwise radix search (``score_mask_radix``,
one dependent full-row count per key bit). The interpreter (CI) runs ``tl.histogram``, same counts. Rows
whose padded width wastes much (11008 -> 16384) are held as two power-of-two pieces (8192 + 4096).

Barriers bound this kernel more than instructions (H100), so: every warp scans the 256
counts itself from [32]-lane tensors, which Triton replicates in every warp (``WSCAN``; a level costs the
one barrier after its atomics); the row's min and max come from a warp reduction and two shared atomics
(``AMM``, one barrier instead of the ~5 of two Triton reductions); and a contiguity hint gives each thread
``VEC`` = 4 columns per access, so every warp access is one contiguous span (Triton's own choice, 16,
follows the uint8 mask store and made the f and W loads span 2-4x their bytes: the L1 was the bottleneck).
"""
from __future__ import annotations

from llmprune_kernels.ops.score_mask_common import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from llmprune_kernels.ops.score_mask_common import _score, _write
    from llmprune_kernels.ops.score_mask_hist_smem import (
        _DECL,
        _INIT_MM,
        _hist_add,
        _hist_read,
        _hist_read8,
        _hist_zero,
        _minmax_atomic,
    )

    @triton.jit
    def _col8(h2d, j: tl.constexpr):
        return tl.sum(tl.where(tl.arange(0, 8)[None, :] == j, h2d, 0), axis=1)

    @triton.jit
    def _pick(hj, run, k, j: tl.constexpr, b, ex, hb):
        """Bin j of each lane: holds the k-th key when the keys below it (``run``) are < k <= run + hj."""
        hit = (run < k) & (run + hj >= k)
        return tl.where(hit, j, b), tl.where(hit, run, ex), tl.where(hit, hj, hb), run + hj

    @triton.jit
    def _hist_step_warp(key, key2, lo, s, cnt, k, ASM: tl.constexpr, REGION: tl.constexpr, ZERO: tl.constexpr,
                        B2: tl.constexpr, INRANGE: tl.constexpr):
        """``_hist_step`` at 256 bins, each warp scanning all bins itself (no barrier after the counts)."""
        lo32 = lo.to(tl.int32)
        if ASM:
            _hist_count_smem(key, key2, lo32, s, 256, REGION, ZERO, B2, INRANGE)
            h0, h1, h2, h3, h4, h5, h6, h7 = _hist_read8(REGION)
        else:
            h2d = tl.reshape(_tl_hist_pieces(key, key2, lo32, s, 256, B2), [32, 8])
            h0, h1, h2, h3 = _col8(h2d, 0), _col8(h2d, 1), _col8(h2d, 2), _col8(h2d, 3)
            h4, h5, h6, h7 = _col8(h2d, 4), _col8(h2d, 5), _col8(h2d, 6), _col8(h2d, 7)
        tot = h0 + h1 + h2 + h3 + h4 + h5 + h6 + h7
        excl = cnt + tl.cumsum(tot, axis=0) - tot  # keys below each lane's first bin
        run = excl
        b = tl.zeros([32], tl.int32)
        ex = b
        hb = b
        b, ex, hb, run = _pick(h0, run, k, 0, b, ex, hb)
        b, ex, hb, run = _pick(h1, run, k, 1, b, ex, hb)
        b, ex, hb, run = _pick(h2, run, k, 2, b, ex, hb)
        b, ex, hb, run = _pick(h3, run, k, 3, b, ex, hb)
        b, ex, hb, run = _pick(h4, run, k, 4, b, ex, hb)
        b, ex, hb, run = _pick(h5, run, k, 5, b, ex, hb)
        b, ex, hb, run = _pick(h6, run, k, 6, b, ex, hb)
        b, ex, hb, run = _pick(h7, run, k, 7, b, ex, hb)
        lane_hit = (excl < k) & (run >= k)  # exactly one lane's bin holds the k-th key
        return _selected_bin(tl.arange(0, 32) * 8 + b, ex, hb, lane_hit, lo, s)

    @triton.jit
    def _selected_bin(bin_, ex, h, sel, lo, s):
        """(start of bin, keys below it, keys in it) of the one element where ``sel``: packed into one sum."""
        packed = (bin_.to(tl.int64) << 42) | (ex.to(tl.int64) << 21) | h.to(tl.int64)
        got = tl.sum(tl.where(sel, packed, 0), axis=0)
        return lo + ((got >> 42) << s.to(tl.int64)), ((got >> 21) & 0x1FFFFF).to(tl.int32), (got & 0x1FFFFF).to(tl.int32)

    @triton.jit
    def _hist_count_smem(key, key2, lo32, s, NB: tl.constexpr, REGION: tl.constexpr, ZERO: tl.constexpr,
                         B2: tl.constexpr, INRANGE: tl.constexpr):
        """Count the keys of both pieces in shared array REGION (zeroed here when ZERO, else by the caller before
        a barrier), then a barrier: the counts are ready to read. INRANGE: see ``_hist_step``."""
        if ZERO:
            _hist_zero(NB, REGION)
            tl.debug_barrier()
        _hist_add(key, lo32, s, NB, REGION, INRANGE)
        if B2 > 0:
            _hist_add(key2, lo32, s, NB, REGION)
        tl.debug_barrier()

    @triton.jit
    def _tl_hist_pieces(key, key2, lo32, s, NB: tl.constexpr, B2: tl.constexpr):
        """The same counts by ``tl.histogram`` (the interpreter, or pieces narrower than the threads)."""
        h = _tl_hist(key, lo32, s, NB)
        if B2 > 0:
            h += _tl_hist(key2, lo32, s, NB)
        return h

    @triton.jit
    def _hist_level(key, key2, lo32, s, NB: tl.constexpr, ASM: tl.constexpr, REGION: tl.constexpr,
                    ZERO: tl.constexpr, B2: tl.constexpr, INRANGE: tl.constexpr):
        """Counts of the keys (of both row pieces when B2 > 0) in [lo, lo + NB << s) by digit (key - lo) >> s;
        other keys are not counted. ASM: in shared array REGION, zeroed here when ZERO (else by the caller,
        before a barrier)."""
        if ASM:
            _hist_count_smem(key, key2, lo32, s, NB, REGION, ZERO, B2, INRANGE)
            h = _hist_read(NB, REGION)
        else:
            h = _tl_hist_pieces(key, key2, lo32, s, NB, B2)
        return h

    @triton.jit
    def _tl_hist(key, lo32, s, NB: tl.constexpr):
        d = (key - lo32).to(tl.uint32, bitcast=True) >> s.to(tl.uint32)
        inr = d < NB
        return tl.histogram(tl.where(inr, d, 0).to(tl.int32), NB, mask=inr)

    @triton.jit
    def _hist_step(key, key2, lo, s, cnt, k, NB: tl.constexpr, ASM: tl.constexpr, REGION: tl.constexpr,
                   ZERO: tl.constexpr, B2: tl.constexpr, WSCAN: tl.constexpr, INRANGE: tl.constexpr = False):
        """One level: (start of the k-th key's bin, keys below it, keys in it); ``cnt`` keys lie below lo.
        INRANGE: every key of the first piece is valid and inside the level's range (the first level)."""
        if WSCAN:
            return _hist_step_warp(key, key2, lo, s, cnt, k, ASM, REGION, ZERO, B2, INRANGE)
        h = _hist_level(key, key2, lo.to(tl.int32), s, NB, ASM, REGION, ZERO, B2, INRANGE)
        cum = cnt + tl.cumsum(h, axis=0)  # keys below the end of each bin
        ex = cum - h
        return _selected_bin(tl.arange(0, NB), ex, h, (ex < k) & (cum >= k), lo, s)  # one bin holds the k-th key

    @triton.jit
    def _hist_select(key, valid, key2, valid2, k, n, BITS0: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr,
                     B2: tl.constexpr, WSCAN: tl.constexpr, AMM: tl.constexpr, EVEN: tl.constexpr):
        """(t, c, e) for the k-th smallest (1-based) key of a row of ``n`` valid keys: prune every key < t and the
        first k - c keys == t in column order, where e keys equal t (when e == k - c: every key <= t).

        The row is ``key`` and, when B2 > 0, a second piece ``key2`` (its columns follow the first's).
        Usually t is the k-th key, c = count(key < t) and e = count(key == t); when the k-th key's bin holds
        only pruned keys, t is the bin's last value (c = k - 1, e = 1: "every key <= t").

        Valid keys are non-negative (see the kernel); padding keys are -1, never in a bin (below every range
        start, they wrap to a huge unsigned digit). The first level has 2^BITS0 bins over [min, max], the
        next ones 2^BITS bins each, until the bin is one key value wide or holds at most two keys. Counts are
        exact (keys outside a level's range are not counted), so the tie count needs no extra pass. ASM: the
        caller has zeroed both shared arrays before a barrier; levels 1 and 2 use arrays 0 and 1, deeper ones
        (rare) alternate and zero their array first.
        """
        cnt = tl.zeros([], tl.int32)  # keys below lo
        if AMM:
            kmin, kmax = _minmax_atomic(key, key2, B2)
        else:
            kmin = tl.min(tl.where(valid, key, 0x7FFFFFFF), axis=0)
            kmax = tl.max(key, axis=0)
            if B2 > 0:
                kmin = tl.minimum(kmin, tl.min(tl.where(valid2, key2, 0x7FFFFFFF), axis=0))
                kmax = tl.maximum(kmax, tl.max(key2, axis=0))
        rng = (kmax - kmin).to(tl.float32)  # exact or rounded up: bit length never under-estimated
        top = ((rng.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126  # bit length of kmax - kmin (> 0)
        s = tl.maximum(top - BITS0, 0)
        lo = kmin.to(tl.int64)
        wl = tl.zeros([], tl.int32)  # log2 width of the k-th key's bin
        n_in = cnt + n  # keys in that bin
        if kmax > kmin:
            lo, cnt, n_in = _hist_step(key, key2, lo, s, cnt, k, 1 << BITS0, ASM, 0, False, B2, WSCAN, EVEN)
            wl = s
            s = tl.maximum(s - BITS, 0)
            if (wl > 0) & (n_in > 2):
                lo, cnt, n_in = _hist_step(key, key2, lo, s, cnt, k, 1 << BITS, ASM, 1, False, B2, WSCAN)
                wl = s
                s = tl.maximum(s - BITS, 0)
                go = (wl > 0) & (n_in > 2)
                level = cnt * 0 + 2
                while go:  # rare: ties or a bin of many close keys
                    if (level & 1) == 0:
                        lo, cnt, n_in = _hist_step(key, key2, lo, s, cnt, k, 1 << BITS, ASM, 0, True, B2, WSCAN)
                    else:
                        lo, cnt, n_in = _hist_step(key, key2, lo, s, cnt, k, 1 << BITS, ASM, 1, True, B2, WSCAN)
                    level += 1
                    wl = s
                    go = (s > 0) & (n_in > 2)
                    s = tl.maximum(s - BITS, 0)
        t = lo.to(tl.int32)
        n_eq = n_in
        if wl > 0:  # one or two keys in a bin wider than one value
            hi = tl.minimum(lo + (tl.full([], 1, tl.int64) << wl.to(tl.int64)) - 1, 0x7FFFFFFF).to(tl.int32)
            if k - cnt == n_in:  # every key of the bin is pruned: prune key <= hi, no pass needed
                t = hi
                cnt = k - 1
                n_eq = cnt * 0 + 1
            else:  # the smaller of two keys: t = their min (tied with the other: the column rank decides)
                inb = (key >= t) & (key <= hi)
                mn = tl.min(tl.where(inb, key, 0x7FFFFFFF), axis=0)
                mx = tl.max(tl.where(inb, key, -1), axis=0)
                if B2 > 0:
                    inb2 = (key2 >= t) & (key2 <= hi)
                    mn = tl.minimum(mn, tl.min(tl.where(inb2, key2, 0x7FFFFFFF), axis=0))
                    mx = tl.maximum(mx, tl.max(tl.where(inb2, key2, -1), axis=0))
                t = mn
                n_eq = tl.where(mn == mx, 2, 1)
        return t, cnt, n_eq

    @triton.jit
    def _hist_out(pm, col, valid, row, n_cols, w_ptr, stride_w, mask_ptr, stride_m, bits_ptr, stride_b,
                  C0: tl.constexpr, BLOCK: tl.constexpr, WRITE_MASK: tl.constexpr, WRITE_BITS: tl.constexpr,
                  ZERO_W: tl.constexpr):
        """Outputs of one row piece (columns C0 + [0, BLOCK)) from ``pm`` (uint32, 1 = pruned; padding columns
        are masked here)."""
        if WRITE_MASK:
            tl.store(mask_ptr + row * stride_m + col, pm.to(tl.uint8), mask=valid)
        if WRITE_BITS or ZERO_W:
            _write(valid & (pm != 0), col, valid, row, w_ptr, stride_w, mask_ptr, stride_m, bits_ptr, stride_b,
                   C0, (n_cols + 7) // 8, BLOCK, False, WRITE_BITS, ZERO_W)

    @triton.jit
    def _piece_keys(w_ptr, g_ptr, f_ptr, cs_ptr, rs, row, col, valid, stride_w, stride_g, MODE: tl.constexpr,
                    GPROMO: tl.constexpr):
        """Order-preserving keys of one row piece; padding columns get -1.

        Scores are >= 0 or NaN (|W| times non-negative factors): clearing the sign bit maps -0.0 to 0 and
        capping at the quiet-NaN pattern makes every NaN one key above +inf, as torch.sort orders them."""
        if MODE == 0:  # Wanda: the key's sign clear makes |W| * f of W * f (f >= 0 or NaN): no abs
            s = (tl.load(w_ptr + row * stride_w + col, mask=valid, other=0.0).to(tl.float32)
                 * tl.load(f_ptr + col, mask=valid, other=0.0))
        else:
            s = _score(w_ptr, g_ptr, f_ptr, cs_ptr, rs, row * stride_w + col, row * stride_g + col, col, valid,
                       MODE, GPROMO)
        return tl.where(valid, tl.minimum(s.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0x7FC00000), -1)

    @triton.jit
    def _rows_hist_kernel(w_ptr, g_ptr, f_ptr, cs_ptr, rs_ptr, mask_ptr, bits_ptr, scratch_ptr,
                          n_rows, n_cols, k, stride_w, stride_g, stride_m, stride_b,
                          MODE: tl.constexpr, GPROMO: tl.constexpr, BLOCK: tl.constexpr, B2: tl.constexpr,
                          BITS0: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr, NT: tl.constexpr,
                          WSCAN: tl.constexpr, AMM: tl.constexpr, VEC: tl.constexpr,
                          EVEN: tl.constexpr, WRITE_MASK: tl.constexpr, WRITE_BITS: tl.constexpr,
                          ZERO_W: tl.constexpr):
        """Unstructured: one row per program, held in registers as [BLOCK] keys and, when B2 > 0, [B2] more for
        columns BLOCK.. (e.g. 11008 = 8192 + 4096 padded, not 16384). EVEN: the first piece is all valid
        (no masks). ``scratch_ptr`` is unused."""
        row = tl.program_id(0).to(tl.int64)
        # VEC: elements per thread and access (a contiguity hint): 4 makes every access of a warp one
        # contiguous span (fp32 f 16 B, fp16 W 8 B, the mask 4 B per lane); without it Triton gives each
        # thread 16 elements (the widest access, the uint8 mask) and its f and W loads span 2-4x the bytes
        col = tl.max_contiguous(tl.arange(0, BLOCK), VEC)
        if EVEN:
            valid = tl.full([BLOCK], 1, tl.int1)
        else:
            valid = col < n_cols
        if MODE == 2:
            rs = tl.load(rs_ptr + row)
        else:
            rs = 1.0
        key = _piece_keys(w_ptr, g_ptr, f_ptr, cs_ptr, rs, row, col, valid, stride_w, stride_g, MODE, GPROMO)
        if B2 > 0:
            col2 = BLOCK + tl.max_contiguous(tl.arange(0, B2), VEC)
            valid2 = col2 < n_cols
            key2 = _piece_keys(w_ptr, g_ptr, f_ptr, cs_ptr, rs, row, col2, valid2, stride_w, stride_g, MODE, GPROMO)
        else:  # placeholders, never read
            col2 = col
            valid2 = valid
            key2 = key
        if ASM:  # declare the histogram arrays once, at the top level of the kernel, and zero them
            tl.inline_asm_elementwise(_DECL, "=r,r", [tl.arange(0, NT)], dtype=tl.int32, is_pure=False, pack=1)
            _hist_zero(1 << BITS0, 0)
            _hist_zero(1 << BITS, 1)
            if AMM:
                tl.inline_asm_elementwise(_INIT_MM, "=r,r", [tl.arange(0, 1)], dtype=tl.int32, is_pure=False, pack=1)
            tl.debug_barrier()
        # Outputs are written in each branch: a mask merged from branches costs a compare-and-select per key
        if k > 0:
            t, cnt, n_eq = _hist_select(key, valid, key2, valid2, k, n_cols, BITS0, BITS, ASM, B2, WSCAN, AMM, EVEN)
            need = k - cnt  # keys == t to prune, the first ones in column order
            if n_eq == need:  # usual case: every key == t is pruned, no column rank needed
                # key <= t as 0/1 from the sign bit of key - (t + 1), no compare (padding is -1: masked)
                pm = (key - (t + 1)).to(tl.uint32, bitcast=True) >> 31
                _hist_out(pm, col, valid, row, n_cols, w_ptr, stride_w, mask_ptr, stride_m, bits_ptr, stride_b,
                          0, BLOCK, WRITE_MASK, WRITE_BITS, ZERO_W)
                if B2 > 0:
                    pm2 = (key2 - (t + 1)).to(tl.uint32, bitcast=True) >> 31
                    _hist_out(pm2, col2, valid2, row, n_cols, w_ptr, stride_w, mask_ptr, stride_m, bits_ptr,
                              stride_b, BLOCK, B2, WRITE_MASK, WRITE_BITS, ZERO_W)
            else:  # ties straddle the k-th (e.g. dequantized weights): rank them in column order
                eq = valid & (key == t)
                e = eq.to(tl.int32)
                rank = tl.cumsum(e, axis=0) - e
                pm = ((key < t) | (eq & (rank < need))).to(tl.uint32)
                _hist_out(pm, col, valid, row, n_cols, w_ptr, stride_w, mask_ptr, stride_m, bits_ptr, stride_b,
                          0, BLOCK, WRITE_MASK, WRITE_BITS, ZERO_W)
                if B2 > 0:
                    eq2 = valid2 & (key2 == t)
                    e2 = eq2.to(tl.int32)
                    rank2 = tl.cumsum(e2, axis=0) - e2 + tl.sum(e, axis=0)
                    pm2 = ((key2 < t) | (eq2 & (rank2 < need))).to(tl.uint32)
                    _hist_out(pm2, col2, valid2, row, n_cols, w_ptr, stride_w, mask_ptr, stride_m, bits_ptr,
                              stride_b, BLOCK, B2, WRITE_MASK, WRITE_BITS, ZERO_W)
        else:
            _hist_out(tl.zeros([BLOCK], tl.uint32), col, valid, row, n_cols, w_ptr, stride_w, mask_ptr, stride_m,
                      bits_ptr, stride_b, 0, BLOCK, WRITE_MASK, WRITE_BITS, ZERO_W)
            if B2 > 0:
                _hist_out(tl.zeros([B2], tl.uint32), col2, valid2, row, n_cols, w_ptr, stride_w, mask_ptr,
                          stride_m, bits_ptr, stride_b, BLOCK, B2, WRITE_MASK, WRITE_BITS, ZERO_W)
