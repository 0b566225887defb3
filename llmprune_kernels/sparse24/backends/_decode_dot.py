"""Triton tensor-core 2:4 decode kernels (kinds ``dot`` and ``dot-swap`` of :mod:`.decode`).

Each program owns BLOCK_N output rows and a 1/SPLIT_K slice of K, streams their packed weight, expands
each tile to dense in registers and feeds ``tl.dot`` with x padded to 16 rows (see :mod:`.decode`).
"""
from __future__ import annotations
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is an optional dependency
    HAS_TRITON = False

if HAS_TRITON:
    from llmprune_kernels.sparse24.backends._decode_stream import _two_byte_aligned

    @triton.jit
    def _load_tile(x_ptr, v_ptr, m_ptr, offs_m, M, offs_n, N, stride_xm, stride_vn, stride_mn, k0, k_end,
                   FULL: tl.constexpr, PAIRS: tl.constexpr, BLOCK_K: tl.constexpr):
        """The packed weight and x [BLOCK_M, BLOCK_K] of one K tile.

        ``PAIRS`` (16-bit weights): one int32 per group (its two kept values) [BLOCK_N, BLOCK_K/4], else the
        values [BLOCK_N, BLOCK_K/2]; metadata bytes [BLOCK_N, BLOCK_K/8] (PAIRS: 2 bytes a thread, the groups
        of its value load, see ``_two_byte_aligned``).
        ``FULL``: the tile lies inside K or is skipped whole, so no mask varies along K and the loads stay
        16-byte vectors (per-column masks split them into 2-byte loads); otherwise every column is masked
        (the ragged last tile). Masked elements load as 0 and add nothing."""
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_b = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        if PAIRS:
            offs_c = k0 // 4 + tl.arange(0, BLOCK_K // 4)
            offs_b = _two_byte_aligned(offs_b, k_end)
            c_end = k_end // 4
        else:
            offs_c = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            c_end = k_end // 2
        if FULL:
            # A dead tile masks whole rows (a scalar & a row mask trips the Triton interpreter).
            live = k0 + BLOCK_K <= k_end
            v_ok = (offs_n < tl.where(live, N, 0))[:, None]
            b_ok = v_ok
            x_ok = (offs_m < tl.where(live, M, 0))[:, None]
        else:
            n_ok = offs_n < N
            m_ok = offs_m < M
            v_ok = n_ok[:, None] & (offs_c[None, :] < c_end)
            b_ok = n_ok[:, None] & (offs_b[None, :] * 8 < k_end)
            x_ok = m_ok[:, None] & (offs_k[None, :] < k_end)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_c[None, :], mask=v_ok, other=0)
        mb = tl.load(m_ptr + offs_n[:, None] * stride_mn + offs_b[None, :], mask=b_ok, other=0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_ok, other=0.0)
        return v, mb, x

    @triton.jit
    def _expand(v, mb, x, PAIRS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The dense [BLOCK_N, BLOCK_K] weight tile (x's dtype) from one tile of ``_load_tile``."""
        mb = mb.to(tl.int32)
        if PAIRS:
            # Integer selects on the int32 pair give each group's (d0, d1) and (d2, d3) halves directly.
            t = tl.reshape(tl.join(mb & 15, mb >> 4), [BLOCK_N, BLOCK_K // 4])  # each group's nibble
            b0 = (t & 1) != 0
            b1 = (t & 2) != 0
            b2 = (t & 4) != 0
            b3 = (t & 8) != 0
            z = tl.zeros_like(v)
            # i0 = (b1 b0) in {0, 1, 2}, i1 = (b3 b2) in {1, 2, 3}, i0 < i1; v = v0 | v1 << 16.
            d01 = tl.where(b1, z, tl.where(b0, v << 16, tl.where(b3, v & 0xFFFF, v)))
            d23 = tl.where(b1, v, tl.where(b3, tl.where(b2, v & -65536, (v >> 16) & 0xFFFF), z))
            d0 = (d01 & 0xFFFF).to(tl.int16).to(x.dtype, bitcast=True)
            d1 = (d01 >> 16).to(tl.int16).to(x.dtype, bitcast=True)
            d2 = (d23 & 0xFFFF).to(tl.int16).to(x.dtype, bitcast=True)
            d3 = (d23 >> 16).to(tl.int16).to(x.dtype, bitcast=True)
        else:
            v0, v1 = tl.split(tl.reshape(v, [BLOCK_N, BLOCK_K // 4, 2]))
            # Metadata: one byte per two groups, low nibble first.
            nib = tl.reshape(tl.join(mb & 15, mb >> 4), [BLOCK_N, BLOCK_K // 4])
            i0 = nib & 3
            i1 = nib >> 2
            zero = tl.zeros_like(v0)
            # i0 < i1, so column 0 can only hold v0 and column 3 only v1.
            d0 = tl.where(i0 == 0, v0, zero)
            d1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
            d2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
            d3 = tl.where(i1 == 3, v1, zero)
        # join(join(d0, d2), join(d1, d3)) flattens to d0, d1, d2, d3 per group.
        return tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), [BLOCK_N, BLOCK_K])

    @triton.jit
    def _mma(acc, x, w, IEEE: tl.constexpr, SWAP: tl.constexpr):
        """acc += x @ w.T ([BLOCK_M, BLOCK_N]), or with SWAP acc += w @ x.T ([BLOCK_N, BLOCK_M]: the weight
        is the MMA's M side, so BLOCK_N >= 64 can use Hopper's wgmma)."""
        if IEEE:
            # fp32 weights (and bf16 under the Triton interpreter, whose bf16 dot is wrong): fp32 math.
            x = x.to(tl.float32)
            w = w.to(tl.float32)
            if SWAP:
                acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        elif SWAP:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        return acc

    @triton.jit
    def _tile_start(M, N, K, K_PER_SPLIT, SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        """This program's K slice index, rows and columns (with their masks), its K slice (start, end, end of
        the whole tiles) and a zero accumulator (``[BLOCK_N, BLOCK_M]`` when SWAP); grid (N, M, K slices)."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_ok = offs_n < N
        m_ok = offs_m < M
        k_start = pid_k * K_PER_SPLIT
        k_end = tl.minimum(K, k_start + K_PER_SPLIT)
        k_full = k_start + (k_end - k_start) // BLOCK_K * BLOCK_K  # end of the whole tiles
        if SWAP:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        return pid_k, offs_m, offs_n, m_ok, n_ok, k_start, k_end, k_full, acc

    @triton.jit
    def _store_tile(acc, y_ptr, b_ptr, pid_k, offs_m, offs_n, m_ok, n_ok, N, stride_ym, stride_ys,
                    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, SWAP: tl.constexpr):
        """y (plus bias) in y's dtype, or K slice ``pid_k``'s fp32 partial when SPLIT_K > 1."""
        if SWAP:  # acc[n, m]: store through transposed offsets
            out_off = offs_m[None, :] * stride_ym + offs_n[:, None]
            out_mask = m_ok[None, :] & n_ok[:, None]
            bias_b = offs_n[:, None]
        else:
            out_off = offs_m[:, None] * stride_ym + offs_n[None, :]
            out_mask = m_ok[:, None] & n_ok[None, :]
            bias_b = offs_n[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + bias_b, mask=bias_b < N, other=0.0).to(tl.float32)
            tl.store(y_ptr + out_off, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
        else:  # fp32 partial of this K slice
            tl.store(y_ptr + pid_k * stride_ys + out_off, acc, mask=out_mask)

    @triton.jit
    def _sparse24_mm_kernel(
        x_ptr, v_ptr, m_ptr, b_ptr, y_ptr,
        M, N, K, K_PER_SPLIT,
        stride_xm, stride_vn, stride_mn, stride_ym, stride_ys,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr, PAIRS: tl.constexpr,
        SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_k, offs_m, offs_n, m_ok, n_ok, k_start, k_end, k_full, acc = _tile_start(
            M, N, K, K_PER_SPLIT, SWAP, BLOCK_M, BLOCK_N, BLOCK_K)
        v_nxt, mb_nxt, x_nxt = _load_tile(x_ptr, v_ptr, m_ptr, offs_m, M, offs_n, N, stride_xm, stride_vn,
                                          stride_mn, k_start, k_end, True, PAIRS, BLOCK_K)
        for k0 in range(k_start, k_full, BLOCK_K):
            v = v_nxt
            mb = mb_nxt
            x = x_nxt
            # Issue the next tile's loads before this tile's math (register double buffering).
            v_nxt, mb_nxt, x_nxt = _load_tile(x_ptr, v_ptr, m_ptr, offs_m, M, offs_n, N, stride_xm,
                                              stride_vn, stride_mn, k0 + BLOCK_K, k_end, True, PAIRS, BLOCK_K)
            acc = _mma(acc, x, _expand(v, mb, x, PAIRS, BLOCK_N, BLOCK_K), IEEE, SWAP)
        if k_full < k_end:  # the ragged last tile, masked per column
            v, mb, x = _load_tile(x_ptr, v_ptr, m_ptr, offs_m, M, offs_n, N, stride_xm, stride_vn, stride_mn,
                                  k_full, k_end, False, PAIRS, BLOCK_K)
            acc = _mma(acc, x, _expand(v, mb, x, PAIRS, BLOCK_N, BLOCK_K), IEEE, SWAP)
        _store_tile(acc, y_ptr, b_ptr, pid_k, offs_m, offs_n, m_ok, n_ok, N, stride_ym, stride_ys, HAS_BIAS,
                    SPLIT_K, SWAP)

    @triton.jit
    def _splitk_reduce_kernel(p_ptr, b_ptr, y_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                              BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < MN
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(SPLIT_K):  # fixed order: deterministic
            acc += tl.load(p_ptr + s * MN + offs, mask=ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


