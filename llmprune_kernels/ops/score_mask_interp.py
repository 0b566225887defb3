"""Opt-in "interp" selection for ``score_and_mask`` (``LLMPRUNE_SCORE_MASK_SELECT=interp``): exact per-row top-k.

radix1 resolves the k-th smallest key one bit per full-row count (15 counts for the high half, then a
bucket). Here each full-row pass counts two pivots placed by interpolating the row's CDF in key space (the
order-preserving int32 key is ~ a scaled log2 of the score, where Wanda-like score distributions are smooth):
the bracket [lo, hi] around the k-th key shrinks from the whole row to <= CAP keys in ~4-6 passes on real
weights (vs 15 bit steps). A pass that shrinks the bracket by less than half makes the next one a safeguarded
three-way split of the key range that also tightens lo / hi to the bracket's smallest / largest key, so ties
(dequantized weights: hundreds of equal scores) end with lo == hi, and every pass strictly narrows the key
range (the loop always ends). The <= CAP bracket keys are then compacted into scratch and ranked pairwise.
Counts use fp32 compares (FSET + FADD, the cheapest count on sm_90) on rows whose keys are 0 or normal/inf
floats, integer compares otherwise (NaN, subnormal scores). One row per program, held in registers as one
``BLOCK`` tile; same result and tie rule as radix1 (the lower column is pruned first among equal scores).
"""
from __future__ import annotations

from llmprune_kernels.ops.score_mask_common import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from llmprune_kernels.ops.score_mask_common import _tile_keys, _write

    @triton.jit
    def _pivot(lo, hi, f):
        """lo + 1 + floor(f * (hi - lo)) clamped into [lo + 1, hi] (needs lo < hi); fp32 math is enough: any
        pivot in the range is exact, only its placement is approximate."""
        span = hi.to(tl.int64) - lo
        d = tl.minimum(tl.maximum(span.to(tl.float32) * f, 0.0), (span - 1).to(tl.float32)).to(tl.int64)
        return (lo + 1 + tl.minimum(d, span - 1)).to(tl.int32)

    @triton.jit
    def _interp_select(key, valid, k, lo, hi, clo, chi, sp, BLOCK: tl.constexpr, CAP: tl.constexpr,
                       FLOAT: tl.constexpr):
        """(t, count(key < t), count(key == t)) for the k-th smallest key t of a [BLOCK] row.

        Invariant: count(key < lo) = clo < k <= chi = count(key <= hi), so lo <= t <= hi.
        """
        bis = tl.zeros([], tl.int32)
        while (chi - clo > CAP) & (lo < hi):  # expected trips: 5 (simulated on LLaMA-like rows: 4-7)
            b = chi - clo
            if bis != 0:  # three-way split of the key range
                fa = 1.0 / 3.0
                fb = 2.0 / 3.0
            else:  # interpolate ranks k -/+ m, m ~ 1.5 sigma of the bracket's keys around a straight CDF
                bf = b.to(tl.float32)
                m = tl.maximum(tl.maximum(1.5 * tl.sqrt(bf), bf / 16.0), 4.0)
                fa = ((k - clo).to(tl.float32) - m) / bf
                fb = ((k - clo).to(tl.float32) + m) / bf
            pa = _pivot(lo, hi, fa)
            pb = _pivot(lo, hi, fb)  # pa <= pb
            # fp32 compares: padding keys (int32 max) are NaN, never below a pivot. Pivots are never subnormal:
            # on this path lo == hi == 0 or lo >= the smallest positive key, a normal float
            if FLOAT:  # both counts in one reduction of a [BLOCK, 2] tile: FSET + FADD per compare on sm_90
                kf = key.to(tl.float32, bitcast=True)
                fa = tl.where(kf < pa.to(tl.float32, bitcast=True), 1.0, 0.0)
                fb = tl.where(kf < pb.to(tl.float32, bitcast=True), 1.0, 0.0)
                ca, cb = tl.split(tl.sum(tl.join(fa, fb), axis=0))
                ca = ca.to(tl.int32)
                cb = cb.to(tl.int32)
            else:
                ia = (key < pa).to(tl.int32)
                ib = (key < pb).to(tl.int32)
                ca, cb = tl.split(tl.sum(tl.join(ia, ib), axis=0))
            if bis != 0:  # smallest and largest key of the bracket: no key lies in [lo, vmin) or (vmax, hi]
                inr = valid & (key >= lo) & (key <= hi)
                vmin = tl.min(tl.where(inr, key, 2147483647), axis=0)
                vmax = tl.max(tl.where(inr, key, -2147483647 - 1), axis=0)
            else:
                vmin = lo
                vmax = hi
            nlo = tl.where(cb < k, pb, tl.where(ca < k, pa, lo))
            nclo = tl.where(cb < k, cb, tl.where(ca < k, ca, clo))
            nhi = tl.where(ca >= k, pa - 1, tl.where(cb >= k, pb - 1, hi))
            nchi = tl.where(ca >= k, ca, tl.where(cb >= k, cb, chi))
            lo = tl.maximum(nlo, vmin)
            hi = tl.minimum(nhi, vmax)
            clo = nclo
            chi = nchi
            bis = ((chi - clo) * 2 > b).to(tl.int32)
        if lo < hi:  # <= CAP keys in [lo, hi]: compact them and rank pairwise
            # slots need only be distinct, not in column order: one relaxed atomic increment of the row's
            # counter (zeroed at the start) per bracket key. Static sm_90 cost at 4096 columns: ~1000 issued
            # instructions per warp, vs ~1400 for a 1-D tl.cumsum (Triton 3.9)
            inb = valid & (key >= lo) & (key <= hi)
            slot = tl.atomic_add(sp + CAP + tl.zeros([BLOCK], tl.int32), 1, mask=inb, sem="relaxed")
            tl.store(sp + slot, key, mask=inb)
            tl.debug_barrier()  # other threads' stores must be visible before the reload
            nb = chi - clo
            lane = tl.arange(0, CAP)
            buf = tl.load(sp + lane, mask=lane < nb, other=2147483647, cache_modifier=".cg")
            less = tl.sum((buf[None, :] < buf[:, None]).to(tl.int32), axis=1)
            # the k-th smallest is the largest bracket key with fewer than k keys below it
            ok = (lane < nb) & (clo + less < k)
            t = tl.max(tl.where(ok, buf, lo), axis=0)
            cnt = clo + tl.max(tl.where(ok, less, 0), axis=0)
            neq = tl.sum(((lane < nb) & (buf == t)).to(tl.int32), axis=0)
        else:  # every key of the bracket equals lo
            t = lo
            cnt = clo
            neq = chi - clo
        return t, cnt, neq

    @triton.jit
    def _rows_interp_kernel(w_ptr, g_ptr, f_ptr, cs_ptr, rs_ptr, mask_ptr, bits_ptr, scratch_ptr,
                            n_rows, n_cols, k, stride_w, stride_g, stride_m, stride_b,
                            MODE: tl.constexpr, GPROMO: tl.constexpr, BLOCK: tl.constexpr,
                            CAP: tl.constexpr, FLOAT: tl.constexpr, WRITE_MASK: tl.constexpr, WRITE_BITS: tl.constexpr,
                            ZERO_W: tl.constexpr):
        """Unstructured, interpolation-bracket select: one row per program, as one [BLOCK] tile in registers.

        First pass: min key, max key, smallest positive key and count(key <= 0); they give the first
        bracket (keys <= 0, or the positive ones) and tell whether fp32 compares order the row's keys
        (FLOAT=False forces integer compares). Then ``_interp_select``, then the tie rule: prune every
        key < t and the first (k - count(< t)) keys == t in column order (all of them when that is every
        key == t, the usual case, which needs no scan).
        """
        row = tl.program_id(0).to(tl.int64)
        col = tl.arange(0, BLOCK)
        valid = col < n_cols
        _, key = _tile_keys(w_ptr, g_ptr, f_ptr, cs_ptr, rs_ptr, row, col, valid, n_rows, stride_w, stride_g,
                            MODE, GPROMO)
        kmin = tl.min(key, axis=0)  # padding is int32 max: never the min while a column is valid
        kmax = tl.max(tl.where(valid, key, -2147483647 - 1), axis=0)
        kpos = tl.min(tl.where(key > 0, key, 2147483647), axis=0)
        z = tl.sum((valid & (key <= 0)).to(tl.int32), axis=0)
        zero = tl.zeros([], tl.int32)
        if k == 0:  # nothing pruned: t = kmin with count(< t) = 0 and a tie count that never equals need = 0
            lo = kmin
            hi = kmin
            clo = zero
            chi = zero - 1
        elif k <= z:  # the k-th key is <= 0 (usually: it is 0, lo == hi at once)
            lo = kmin
            hi = tl.minimum(kmax, 0)
            clo = zero
            chi = z
        else:
            lo = kpos
            hi = kmax
            clo = z
            chi = zero + n_cols
        sp = scratch_ptr + row * (CAP + 1)  # CAP keys, then the bracket's slot counter
        tl.store(sp + CAP, 0)
        tl.debug_barrier()  # the counter is zero before any thread increments it
        # fp32 order == key order for keys 0 and [smallest normal, +inf]; NaN, negative, subnormal: integers
        if FLOAT:
            if (kmin >= 0) & (kmax <= 0x7F800000) & (kpos >= 0x00800000):
                t, cnt, neq = _interp_select(key, valid, k, lo, hi, clo, chi, sp, BLOCK, CAP, True)
            else:  # NaN, negative or subnormal scores in this row
                t, cnt, neq = _interp_select(key, valid, k, lo, hi, clo, chi, sp, BLOCK, CAP, False)
        else:
            t, cnt, neq = _interp_select(key, valid, k, lo, hi, clo, chi, sp, BLOCK, CAP, False)
        need = k - cnt
        if need == neq:  # every key == t is pruned
            prune = valid & (key <= t)
        else:
            eq = (valid & (key == t)).to(tl.int32)
            rank = tl.cumsum(eq, axis=0) - eq  # equal keys before this column
            prune = valid & ((key < t) | ((eq != 0) & (rank < need)))
        _write(prune, col, valid, row, w_ptr, stride_w, mask_ptr, stride_m, bits_ptr, stride_b, 0,
               (n_cols + 7) // 8, BLOCK, WRITE_MASK, WRITE_BITS, ZERO_W)
