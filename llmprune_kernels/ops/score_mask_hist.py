"""Exact per-row top-k by histogram radix select: the ``select="hist"`` unstructured kernel.

A row stays in registers as order-preserving int32 keys. The k-th smallest key t is found a digit of
``BITS`` bits at a time: each level histograms the keys of the current range [lo, lo + 2^(s+BITS)) by
digit ``(key - lo) >> s`` (keys below the range fall in bin 0, above it in the last bin, which leaves the
cumulative count correct up to the bin of the k-th key), and keeps the bin where the cumulative count
reaches k. The first range is the row's [min, max], so two 8-bit levels usually leave a bin of one or
two keys, whose min or max is then t; at most four levels reach a single key value. ``tl.histogram``
counts with warp ballots (a few instructions per key and level), so the whole select costs a handful of
passes over the registers instead of one dependent reduction per key bit (``score_mask_radix``).
Then every key < t is pruned plus the first (k - count(< t)) keys == t in column order: "stable ascending
sort, prune the first k", equal bit for bit to ``mask_from_score``.
"""
from __future__ import annotations

from llmprune_kernels.ops.score_mask_common import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from llmprune_kernels.ops.score_mask_common import _score, _write

    # PTX for the shared-memory histogram (CUDA only; the interpreter takes tl.histogram). ``lpk_hist`` is a
    # static shared array of HIST_BINS counters that Triton's own (dynamic) shared memory never overlaps.
    _DECL = tl.constexpr(".shared .align 16 .b32 lpk_hist[264];\nmov.u32 $0, 0;")
    _ZERO = tl.constexpr("{ .reg .u32 a; mov.u32 a, lpk_hist; mad.lo.u32 a, $1, 4, a; st.shared.u32 [a], 0; "
                           "mov.u32 $0, 0; }")
    _READ = tl.constexpr("{ .reg .u32 a; mov.u32 a, lpk_hist; mad.lo.u32 a, $1, 4, a; ld.volatile.shared.u32 $0, [a]; }")
    # digit u = (key - lo) >> s counted when u < NB (keys below lo wrap to huge unsigned values: not counted)
    _ADD = tl.constexpr("{ .reg .pred p; .reg .u32 u, a; sub.u32 u, $1, $2; shr.u32 u, u, $3; "
                          "setp.lt.u32 p, u, $4; mov.u32 a, lpk_hist; mad.lo.u32 a, u, 4, a; "
                          "@p red.shared.add.u32 [a], 1; mov.u32 $0, 0; }")
    # the same without a branch per key: keys out of range count in a spare bin NB that is never read
    _ADD_SPARE = tl.constexpr("{ .reg .u32 u, a; sub.u32 u, $1, $2; shr.u32 u, u, $3; min.u32 u, u, $4; "
                              "mov.u32 a, lpk_hist; mad.lo.u32 a, u, 4, a; red.shared.add.u32 [a], 1; mov.u32 $0, 0; }")

    @triton.jit
    def _hist_level(key, lo32, s, NB: tl.constexpr, ASM: tl.constexpr, SPARE: tl.constexpr):
        """Counts of the keys in [lo, lo + NB << s) by digit (key - lo) >> s; other keys are not counted."""
        bins = tl.arange(0, NB)
        if ASM:
            tl.inline_asm_elementwise(_ZERO, "=r,r", [bins], dtype=tl.int32, is_pure=False, pack=1)
            tl.debug_barrier()
            if SPARE:
                tl.inline_asm_elementwise(_ADD_SPARE, "=r,r,r,r,r", [key, lo32, s, NB], dtype=tl.int32,
                                          is_pure=False, pack=1)
            else:
                tl.inline_asm_elementwise(_ADD, "=r,r,r,r,r", [key, lo32, s, NB], dtype=tl.int32, is_pure=False,
                                          pack=1)
            tl.debug_barrier()
            h = tl.inline_asm_elementwise(_READ, "=r,r", [bins], dtype=tl.int32, is_pure=False, pack=1)
            tl.debug_barrier()  # every thread has read before the next level zeroes
        else:
            d = (key - lo32).to(tl.uint32, bitcast=True) >> s.to(tl.uint32)
            inr = d < NB
            h = tl.histogram(tl.where(inr, d, 0).to(tl.int32), NB, mask=inr)
        return h

    @triton.jit
    def _hist_select(key, valid, k, BITS: tl.constexpr, ASM: tl.constexpr, SPARE: tl.constexpr):
        """(t, count(key < t)) for the k-th smallest (1-based) key t of one row; k >= 1.

        Valid keys are non-negative (scores are >= 0 or NaN, see ``_keys``); padding keys are -1, which is
        never counted (below every range start, it wraps to a huge unsigned digit).
        """
        NB: tl.constexpr = 1 << BITS
        kmin = tl.min(tl.where(valid, key, 0x7FFFFFFF), axis=0)
        kmax = tl.max(key, axis=0)
        rng = (kmax - kmin).to(tl.float32)  # exact or rounded up: bit length never under-estimated
        top = ((rng.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126  # bit length of kmax - kmin (> 0)
        s = tl.maximum(top - BITS, 0)
        lo = kmin.to(tl.int64)
        cnt = tl.zeros([], tl.int32)  # keys below lo
        wl = tl.zeros([], tl.int32)  # log2 width of the current bin
        n_in = cnt + 2147483647  # keys in the current bin (upper bound)
        go = kmax > kmin
        while go:
            h = _hist_level(key, lo.to(tl.int32), s, NB, ASM, SPARE)
            cum = cnt + tl.cumsum(h, axis=0)  # keys below the end of each bin
            below = cum < k  # bins wholly below the k-th key
            b = tl.sum(below.to(tl.int32), axis=0)
            n_in = tl.min(tl.where(below, 2147483647, cum), axis=0)
            cnt = tl.maximum(cnt, tl.max(tl.where(below, cum, 0), axis=0))
            n_in = n_in - cnt
            lo = lo + (b.to(tl.int64) << s.to(tl.int64))
            wl = s
            go = (s > 0) & (n_in > 2)
            s = tl.maximum(s - BITS, 0)
        t = lo.to(tl.int32)
        if wl > 0:  # one or two keys in a bin wider than one value: the k-th is its min or max
            hi = tl.minimum(lo + (tl.full([], 1, tl.int64) << wl.to(tl.int64)) - 1, 0x7FFFFFFF).to(tl.int32)
            inb = (key >= t) & (key <= hi)
            mn = tl.min(tl.where(inb, key, 0x7FFFFFFF), axis=0)
            mx = tl.max(tl.where(inb, key, 0), axis=0)
            second = (k - cnt) > 1
            t = tl.where(second, mx, mn)
            cnt = tl.where(second & (mn < mx), cnt + 1, cnt)
        return t, cnt

    @triton.jit
    def _rows_hist_kernel(w_ptr, g_ptr, f_ptr, cs_ptr, rs_ptr, mask_ptr, bits_ptr, scratch_ptr,
                          n_rows, n_cols, k, stride_w, stride_g, stride_m, stride_b,
                          MODE: tl.constexpr, GPROMO: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr,
                          ASM: tl.constexpr, SPARE: tl.constexpr, NT: tl.constexpr, EVEN: tl.constexpr, WRITE_MASK: tl.constexpr, WRITE_BITS: tl.constexpr, ZERO_W: tl.constexpr):
        """Unstructured: one row per program, held in registers ([BLOCK] keys); ``scratch_ptr`` is unused."""
        row = tl.program_id(0).to(tl.int64)
        col = tl.arange(0, BLOCK)
        if EVEN:  # the row fills the block: no masks
            valid = tl.full([BLOCK], 1, tl.int1)
        else:
            valid = col < n_cols
        if MODE == 2:
            rs = tl.load(rs_ptr + row)
        else:
            rs = 1.0
        s = _score(w_ptr, g_ptr, f_ptr, cs_ptr, rs, row * stride_w + col, row * stride_g + col, col, valid,
                   MODE, GPROMO)
        # scores are >= 0 or NaN (|W| times non-negative factors): clearing the sign bit maps -0.0 to 0 and
        # capping at the quiet-NaN pattern makes every NaN one key above +inf, as torch.sort orders them
        key = tl.where(valid, tl.minimum(s.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0x7FC00000), -1)
        if ASM:  # declare the histogram's shared array once, at the top level of the kernel
            tl.inline_asm_elementwise(_DECL, "=r,r", [tl.arange(0, NT)],
                                      dtype=tl.int32, is_pure=False, pack=1)
        if k > 0:
            t, cnt = _hist_select(key, valid, k, BITS, ASM, SPARE)
            eq = valid & (key == t)
            need = k - cnt  # keys == t to prune, the first ones in column order
            if tl.sum(eq.to(tl.int32), axis=0) == need:  # usual case: no column rank needed
                prune = valid & (key <= t)
            else:  # ties straddle the k-th (e.g. dequantized weights): rank them in column order
                e = eq.to(tl.int32)
                rank = tl.cumsum(e, axis=0) - e
                prune = valid & ((key < t) | (eq & (rank < need)))
        else:
            prune = col < 0
        _write(prune, col, valid, row, w_ptr, stride_w, mask_ptr, stride_m, bits_ptr, stride_b,
               0, (n_cols + 7) // 8, BLOCK, WRITE_MASK, WRITE_BITS, ZERO_W)
