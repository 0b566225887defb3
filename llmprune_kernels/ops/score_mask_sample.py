"""Opt-in "sample" selection for ``score_and_mask`` (``LLMPRUNE_SCORE_MASK_SELECT=sample``): exact per-row top-k.

The bitwise radix select (radix1) is a chain of ~30 dependent per-row reductions. Here a few hundred evenly
spaced columns are ranked pairwise to bracket the k-th smallest key; one pass counts seven candidates on the whole
row (independent reductions), and the few keys inside the bracket are compacted and ranked pairwise. When
the bracket holds more keys than the scratch buffer (rows full of ties), the program falls back to the
bitwise radix search on its register tile. Same result and tie rule as the other selects; 3.3-3.9x slower
than radix1 on the H100.
"""
from __future__ import annotations

from llmprune_kernels.ops.score_mask_common import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from llmprune_kernels.ops.score_mask_common import _keys, _score, _tile_keys
    from llmprune_kernels.ops.score_mask_radix import _rows_radix_search

    @triton.jit
    def _sample_bracket(w_ptr, g_ptr, f_ptr, cs_ptr, rs, rows, key, valid, n_rows, n_cols, k, stride_w, stride_g,
                        MODE: tl.constexpr, GPROMO: tl.constexpr, R: tl.constexpr, S: tl.constexpr, D: tl.constexpr):
        """Bracket [lo, hi) of the k-th smallest key from a sample of the row, with exact counts.

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
    def _bracket_select(key, valid, lo, hi, nohi, clo, nb, k, sp, R: tl.constexpr, CAP: tl.constexpr):
        """(t, count(< t), count(== t)) from the nb <= CAP keys in [lo, hi), compacted into sp, ranked pairwise."""
        inb = valid & (key >= lo[:, None]) & ((key < hi[:, None]) | (nohi[:, None] == 1))
        pos = tl.cumsum(inb.to(tl.int32), axis=1) - 1
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
        return t, base, neq

    @triton.jit
    def _rows_sample_kernel(w_ptr, g_ptr, f_ptr, cs_ptr, rs_ptr, mask_ptr, bits_ptr, scratch_ptr,
                            n_rows, n_cols, k, stride_w, stride_g, stride_m, stride_b,
                            MODE: tl.constexpr, GPROMO: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
                            CAP: tl.constexpr, SAMPLE: tl.constexpr, BRACKET: tl.constexpr,
                            WRITE_MASK: tl.constexpr, WRITE_BITS: tl.constexpr, ZERO_W: tl.constexpr):
        """Unstructured, sample-bracket select: R rows per program, each row a [BLOCK] slice in registers.

        t = the k-th smallest key, base = count(key < t); the tie rule then prunes every key < t and the
        first (k - base) keys == t in column order. SAMPLE keys per row for the bracket, CAP int32 of
        scratch per row for its keys. BRACKET=False skips the bracket: the radix search alone (tests, and
        the cost of the fallback in benchmarks).
        """
        r1 = (tl.program_id(0) * R + tl.arange(0, R)).to(tl.int64)
        rows = r1[:, None]
        col = tl.arange(0, BLOCK)[None, :]
        valid = (col < n_cols) & (rows < n_rows)
        rs, key = _tile_keys(w_ptr, g_ptr, f_ptr, cs_ptr, rs_ptr, rows, col, valid, n_rows, stride_w, stride_g,
                             MODE, GPROMO)
        if BRACKET:
            lo, hi, nohi, clo, nb = _sample_bracket(w_ptr, g_ptr, f_ptr, cs_ptr, rs, rows, key, valid, n_rows, n_cols,
                                                    k, stride_w, stride_g, MODE, GPROMO, R, SAMPLE,
                                                    max(1, SAMPLE // 40))
            if tl.max(nb, axis=0) <= CAP:
                t, base, neq = _bracket_select(key, valid, lo, hi, nohi, clo, nb, k, scratch_ptr + rows * CAP, R, CAP)
            else:  # more keys in the bracket than the buffer holds (e.g. rows of ties): bitwise search
                t, base = _rows_radix_search(key, k)
                neq = tl.full([R], -1, tl.int32)  # unknown: take the ranked tie rule below
        else:
            t, base = _rows_radix_search(key, k)
            neq = tl.full([R], -1, tl.int32)
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
