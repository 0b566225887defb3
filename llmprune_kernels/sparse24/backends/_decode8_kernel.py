"""Triton 8-bit 2:4 decode kernel (backend ``decode8``): the ``dot`` / ``dot-swap`` kernels of
:mod:`._decode_dot` reading FP8 e4m3 or INT8 values plus their scales (:mod:`llmprune_kernels.sparse24.quant8`).

Each program owns BLOCK_N output rows and a 1/SPLIT_K slice of K. Per K tile, the 8-bit values
``[BLOCK_N, BLOCK_K/2]`` (one byte each: full tiles carry no per-column mask, so they load as 16-byte vectors)
and their metadata bytes are loaded one tile ahead (``_decode_dot._load_tile``), converted to x's dtype in
registers, expanded to the dense tile (``_decode_dot._expand``) and fed to ``tl.dot`` (fp32 accumulation).
The conversion is exact: every e4m3 value and every integer in [-127, 127] is a float16 and a bfloat16.
Scales are applied in fp32, where they cost least:

* ``SCALE_MODE`` 0 (one per output channel): the accumulator is scaled once, in the epilogue;
* 1 (per group, ``GROUP`` a multiple of BLOCK_K: one scale per row and tile): each tile's product is scaled
  before it is added;
* 2 (per group, any other ``GROUP``): each value is scaled before expansion (the scales gathered per value,
  the product rounded to x's dtype).

Reference: :func:`llmprune_kernels.reference.sparse24_8bit.sparse24_8bit_linear_reference`.
"""
from __future__ import annotations

from llmprune_kernels.sparse24.backends._decode_dot import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from llmprune_kernels.sparse24.backends._decode_dot import _expand, _load_tile, _mma, _store_tile, _tile_start

    @triton.jit
    def _codes(v, FP8: tl.constexpr, F32: tl.constexpr, x):
        """8-bit codes (e4m3 bits as uint8, or int8) as fp32 (``F32``) or x's dtype, exactly."""
        if FP8:
            w = v.to(tl.float8e4nv, bitcast=True)
            if F32:
                w = w.to(tl.float32)
            elif x.dtype == tl.float16:
                w = w.to(tl.float16)
            else:  # bf16 through fp32 (direct e4m3 -> bf16 conversions are not on every target)
                w = w.to(tl.float32).to(x.dtype)
        elif F32:
            w = v.to(tl.float32)
        elif x.dtype == tl.float16:
            w = v.to(tl.float16)
        else:  # int8 -> bf16 through fp32 (the interpreter's direct conversion is wrong)
            w = v.to(tl.float32).to(x.dtype)
        return w

    @triton.jit
    def _q8_step(acc, v, mb, x, s_ptr, offs_n, N, stride_sn, k0, k_end,
                 FP8: tl.constexpr, IEEE: tl.constexpr, SWAP: tl.constexpr, SCALE_MODE: tl.constexpr,
                 GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc += this K tile's product (scaled as SCALE_MODE says)."""
        if SCALE_MODE == 2:
            offs_c = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            grp = (offs_c // 2 * 4) // GROUP  # a 2:4 group (packed columns 2g, 2g+1) lies in one scale group
            s_ok = (offs_n < N)[:, None] & (offs_c[None, :] < k_end // 2)
            s = tl.load(s_ptr + offs_n[:, None] * stride_sn + grp[None, :], mask=s_ok, other=0.0).to(tl.float32)
            w = _codes(v, FP8, True, x) * s
            if not IEEE:
                w = w.to(x.dtype)
        else:
            w = _codes(v, FP8, IEEE, x)
        w = _expand(w, mb, x, False, BLOCK_N, BLOCK_K)
        if SCALE_MODE == 1:
            s = tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP, mask=offs_n < N, other=0.0).to(tl.float32)
            part = _mma(tl.zeros_like(acc), x, w, IEEE, SWAP)
            if SWAP:
                acc += part * s[:, None]
            else:
                acc += part * s[None, :]
        else:
            acc = _mma(acc, x, w, IEEE, SWAP)
        return acc

    @triton.jit(do_not_specialize=["M"])  # one compiled kernel per config for every M (1 and 16 included)
    def _sparse24_q8_kernel(
        x_ptr, v_ptr, m_ptr, s_ptr, b_ptr, y_ptr,
        M, N, K, K_PER_SPLIT,
        stride_xm, stride_vn, stride_mn, stride_sn, stride_ym, stride_ys,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr, SWAP: tl.constexpr,
        FP8: tl.constexpr, SCALE_MODE: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """``y = x @ (q * scale).T (+ bias)`` for the 8-bit packing; ``v_ptr``: the values as uint8 (FP8 bits)
        or int8. SPLIT_K > 1 writes scaled fp32 partials, summed by ``_decode_dot._splitk_reduce_kernel``."""
        pid_k, offs_m, offs_n, m_ok, n_ok, k_start, k_end, k_full, acc = _tile_start(
            M, N, K, K_PER_SPLIT, SWAP, BLOCK_M, BLOCK_N, BLOCK_K)
        v_nxt, mb_nxt, x_nxt = _load_tile(x_ptr, v_ptr, m_ptr, offs_m, M, offs_n, N, stride_xm, stride_vn,
                                          stride_mn, k_start, k_end, True, False, BLOCK_K)
        for k0 in range(k_start, k_full, BLOCK_K):
            v = v_nxt
            mb = mb_nxt
            x = x_nxt
            # Issue the next tile's loads before this tile's math (register double buffering).
            v_nxt, mb_nxt, x_nxt = _load_tile(x_ptr, v_ptr, m_ptr, offs_m, M, offs_n, N, stride_xm, stride_vn,
                                              stride_mn, k0 + BLOCK_K, k_end, True, False, BLOCK_K)
            acc = _q8_step(acc, v, mb, x, s_ptr, offs_n, N, stride_sn, k0, k_end, FP8, IEEE, SWAP, SCALE_MODE,
                           GROUP, BLOCK_N, BLOCK_K)
        if k_full < k_end:  # the ragged last tile, masked per column
            v, mb, x = _load_tile(x_ptr, v_ptr, m_ptr, offs_m, M, offs_n, N, stride_xm, stride_vn, stride_mn,
                                  k_full, k_end, False, False, BLOCK_K)
            acc = _q8_step(acc, v, mb, x, s_ptr, offs_n, N, stride_sn, k_full, k_end, FP8, IEEE, SWAP,
                           SCALE_MODE, GROUP, BLOCK_N, BLOCK_K)
        if SCALE_MODE == 0:  # one scale per output channel: applied once (linear, so split-K partials too)
            s = tl.load(s_ptr + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
            if SWAP:
                acc = acc * s[:, None]
            else:
                acc = acc * s[None, :]
        _store_tile(acc, y_ptr, b_ptr, pid_k, offs_m, offs_n, m_ok, n_ok, N, stride_ym, stride_ys, HAS_BIAS,
                    SPLIT_K, SWAP)
