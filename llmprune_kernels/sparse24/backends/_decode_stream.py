"""Triton 2:4 streaming decode kernels on CUDA cores for M <= 16 (kinds 2 = select, 3 = expand, of ``sparse24_mm``).

At decode sizes a 2:4 matmul is one pass over the packed weight in HBM (4.5 bytes per 4 fp16/bf16 weights
against dense's 8, a 1.78x limit), so the kernel is built around that stream and keeps everything else out
of the hot loop: no gathers of x from global memory by metadata index, no shared-memory round trip for the
weight, and no second launch unless split-K is asked for. Each program owns BLOCK_N output rows and walks
K in tiles of BLOCK_G groups (4 columns):

* per row, the tile's value pairs as one int32 per group (16-byte loads: full tiles carry no per-column
  mask) and its metadata bytes, loaded 2 bytes a thread so the nibbles land in the values' registers
  (``_two_byte_aligned``); x as its 4 per-group columns ``[BLOCK_M, BLOCK_G]`` (small, L1/L2 resident;
  only these are re-laid out). All of it is issued one tile ahead (register double buffering): Triton's
  pipeliner does not overlap loads that feed register math;
* ``SELECT``: per kept value, the nibble's bits pick the x column with two ``where`` (i0 in {0,1,2},
  i1 in {1,2,3}), then 2 FMAs per group and x row. ``EXPAND``: the 4 dense weights of each group are
  rebuilt once (cost independent of M), then 4 FMAs per group and x row. fp32 math; bf16 widens by a
  shift, fp16 by a convert;
* the output (+ bias) is stored directly with SPLIT_K = 1; SPLIT_K > 1 (weights with few rows) writes fp32
  partials that the dot kernels' reduce kernel sums in a fixed order (deterministic).

Both run any M <= 16, but the FMAs grow with M while a tensor-core kernel's cost does not: from the sm_90
SASS SELECT's main loop costs about 23 instructions per weight group at
M = 1 and 30 at M = 2, EXPAND 43 and more, the wgmma dot-swap kernel 22-25 at any M. So only SELECT at
M <= 2 is a tuning candidate; the measurement per weight shape (``decode.tune_config``) decides.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is an optional dependency
    HAS_TRITON = False

MAX_M = 16

if HAS_TRITON:

    @triton.jit
    def _two_byte_aligned(offs, k_end):
        """``offs`` (contiguous metadata byte offsets), seen by Triton as only 2-byte aligned.

        A thread's 16-byte value load holds 4 groups (4 int32 pairs) = 2 metadata bytes. Loaded as they
        are, the bytes would come as 16-byte vectors (32 groups a thread) and Triton would re-lay out the
        values to match (through shared memory, every tile). The select never takes its second arm
        (``k_end >= 0``), but it caps the provable alignment, so each thread loads exactly its 2 bytes and
        the nibbles land in the values' registers."""
        return tl.where(k_end >= 0, offs, offs + 2)

    @triton.jit
    def _stream_load(x_ptr, w_ptr, m_ptr, offs_m, M, rows, N, stride_xm, stride_wn, stride_mn, g0, g_end,
                     FULL: tl.constexpr, BLOCK_G: tl.constexpr):
        """One tile: value pairs (int32) ``[1, BLOCK_N, BLOCK_G]``, metadata bytes ``[1, BLOCK_N, BLOCK_G/2]``,
        x columns ``[BLOCK_M, BLOCK_G]``.

        ``FULL``: the tile lies inside K or is skipped whole, so no mask varies along K (16-byte vector
        loads); otherwise every group is masked (the ragged last tile). Masked elements load as 0."""
        offs_g = g0 + tl.arange(0, BLOCK_G)
        g3 = offs_g[None, None, :]
        if FULL:
            # A dead tile masks whole rows (a scalar & a row mask trips the Triton interpreter).
            live = g0 + BLOCK_G <= g_end
            w_ok = rows < tl.where(live, N, 0)
            x_ok = (offs_m < tl.where(live, M, 0))[:, None]
        else:
            w_ok = (rows < N) & (g3 < g_end)
            x_ok = (offs_m < M)[:, None] & (offs_g[None, :] < g_end)
        w = tl.load(w_ptr + rows * stride_wn + g3, mask=w_ok, other=0)
        b3 = _two_byte_aligned((g0 // 2 + tl.arange(0, BLOCK_G // 2))[None, None, :], g_end)
        if FULL:
            b_ok = w_ok
        else:
            b_ok = (rows < N) & (b3 * 2 < g_end)
        mb = tl.load(m_ptr + rows * stride_mn + b3, mask=b_ok, other=0)  # byte b: groups 2b (low nibble), 2b+1
        xp = x_ptr + offs_m[:, None] * stride_xm + offs_g[None, :] * 4
        x0 = tl.load(xp, mask=x_ok, other=0.0)
        x1 = tl.load(xp + 1, mask=x_ok, other=0.0)
        x2 = tl.load(xp + 2, mask=x_ok, other=0.0)
        x3 = tl.load(xp + 3, mask=x_ok, other=0.0)
        return w, mb, x0, x1, x2, x3

    @triton.jit
    def _stream_math(acc, w, mb, x0, x1, x2, x3, EXPAND: tl.constexpr):
        """``acc [BLOCK_M, BLOCK_N, BLOCK_G] +=`` each group's contribution, fp32."""
        if x0.dtype == tl.bfloat16:  # bf16 -> fp32 is a 16-bit shift
            v0 = (w << 16).to(tl.float32, bitcast=True)
            v1 = (w & -65536).to(tl.float32, bitcast=True)
        else:
            v0 = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            v1 = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        mb = mb.to(tl.int32)
        t = tl.reshape(tl.join(mb & 15, mb >> 4), w.shape)  # each group's nibble: i0 = bits 0-1, i1 = bits 2-3
        x0 = x0.to(tl.float32)[:, None, :]
        x1 = x1.to(tl.float32)[:, None, :]
        x2 = x2.to(tl.float32)[:, None, :]
        x3 = x3.to(tl.float32)[:, None, :]
        b0 = (t & 1) != 0
        b1 = (t & 2) != 0
        b2 = (t & 4) != 0
        b3 = (t & 8) != 0
        if EXPAND:
            z = tl.zeros_like(v0)
            # i0 = (b1 b0) in {0, 1, 2}, i1 = (b3 b2) in {1, 2, 3}, i0 < i1.
            d0 = tl.where(b0 | b1, z, v0)
            d1 = tl.where(b1, z, tl.where(b0, v0, tl.where(b3, z, v1)))
            d2 = tl.where(b1, v0, tl.where(b3 & ~b2, v1, z))
            d3 = tl.where(b3 & b2, v1, z)
            acc += d0 * x0
            acc += d1 * x1
            acc += d2 * x2
            acc += d3 * x3
        else:
            acc += v0 * tl.where(b1, x2, tl.where(b0, x1, x0))
            acc += v1 * tl.where(b3, tl.where(b2, x3, x2), x1)
        return acc

    @triton.jit
    def _stream_start(M, N, G, G_PER_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
        """This program's K slice index, rows and columns (with masks; ``rows`` as [1, BLOCK_N, 1]) and its
        slice of the G units along K (start, end, end of the whole tiles); grid (N tiles, K slices)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        rows = offs_n[None, :, None]
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        g_start = pid_k * G_PER_SPLIT
        g_end = tl.minimum(G, g_start + G_PER_SPLIT)
        g_full = g_start + (g_end - g_start) // BLOCK_G * BLOCK_G  # end of the whole tiles
        return pid_k, offs_m, offs_n, m_ok, n_ok, rows, g_start, g_end, g_full

    @triton.jit
    def _store_rows(out, y_ptr, b_ptr, pid_k, offs_m, offs_n, m_ok, n_ok, stride_ym, stride_ys,
                    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
        """``out [BLOCK_M, BLOCK_N]`` (plus bias) in y's dtype, or K slice ``pid_k``'s fp32 partial."""
        out_mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                out += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], out.to(y_ptr.dtype.element_ty),
                     mask=out_mask)
        else:  # fp32 partial of this K slice
            tl.store(y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :], out, mask=out_mask)

    @triton.jit
    def _sparse24_stream_kernel(
        x_ptr, w_ptr, m_ptr, b_ptr, y_ptr,
        M, N, G, G_PER_SPLIT,
        stride_xm, stride_wn, stride_mn, stride_ym, stride_ys,
        HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EXPAND: tl.constexpr, ACC3: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    ):
        """``w_ptr``: the packed values viewed as int32, one per group (its two kept values)."""
        pid_k, offs_m, offs_n, m_ok, n_ok, rows, g_start, g_end, g_full = _stream_start(
            M, N, G, G_PER_SPLIT, BLOCK_M, BLOCK_N, BLOCK_G)
        out = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if ACC3:  # per-group sums stay in registers across tiles, reduced once at the end
            acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_G], dtype=tl.float32)
        w_n, mb_n, x0_n, x1_n, x2_n, x3_n = _stream_load(x_ptr, w_ptr, m_ptr, offs_m, M, rows, N, stride_xm,
                                                         stride_wn, stride_mn, g_start, g_end, True, BLOCK_G)
        for g0 in range(g_start, g_full, BLOCK_G):
            w, mb, x0, x1, x2, x3 = w_n, mb_n, x0_n, x1_n, x2_n, x3_n
            # Issue the next tile's loads before this tile's math.
            w_n, mb_n, x0_n, x1_n, x2_n, x3_n = _stream_load(x_ptr, w_ptr, m_ptr, offs_m, M, rows, N,
                                                             stride_xm, stride_wn, stride_mn, g0 + BLOCK_G, g_end,
                                                             True, BLOCK_G)
            if ACC3:
                acc = _stream_math(acc, w, mb, x0, x1, x2, x3, EXPAND)
            else:  # too many registers for that: reduce every tile
                out += tl.sum(_stream_math(tl.zeros([BLOCK_M, BLOCK_N, BLOCK_G], dtype=tl.float32),
                                           w, mb, x0, x1, x2, x3, EXPAND), axis=2)
        if g_full < g_end:  # the ragged last tile, masked per group
            w, mb, x0, x1, x2, x3 = _stream_load(x_ptr, w_ptr, m_ptr, offs_m, M, rows, N, stride_xm,
                                                 stride_wn, stride_mn, g_full, g_end, False, BLOCK_G)
            if ACC3:
                acc = _stream_math(acc, w, mb, x0, x1, x2, x3, EXPAND)
            else:
                out += tl.sum(_stream_math(tl.zeros([BLOCK_M, BLOCK_N, BLOCK_G], dtype=tl.float32),
                                           w, mb, x0, x1, x2, x3, EXPAND), axis=2)
        if ACC3:
            out += tl.sum(acc, axis=2)
        _store_rows(out, y_ptr, b_ptr, pid_k, offs_m, offs_n, m_ok, n_ok, stride_ym, stride_ys, HAS_BIAS, SPLIT_K)


def as_pairs(values: torch.Tensor) -> torch.Tensor:
    """The ``[out, in/2]`` 16-bit values viewed as ``[out, in/4]`` int32, one per group (copied if misaligned)."""
    try:
        return values.view(torch.int32)
    except RuntimeError:  # odd storage offset or a non-contiguous row
        return values.contiguous().clone().view(torch.int32)


def plan_stream(values, meta, bias, m, n, k, bn, bg, split, expand, kw, reduce_kernel):
    """Bind one streaming-kernel launch for ``m`` rows: returns ``run(x, sx, y)`` (x rows ``sx`` apart,
    contiguous ``y [m, n]``); ``reduce_kernel`` sums split-K partials."""
    if m > MAX_M or values.element_size() != 2:
        raise ValueError(f"the streaming decode kernel takes M <= {MAX_M} and 16-bit weights, got M={m}, "
                         f"{values.dtype}")
    g = k // 4
    g_per_split = triton.cdiv(triton.cdiv(g, split), bg) * bg
    split = triton.cdiv(g, g_per_split)  # never launch an empty K slice
    bm = triton.next_power_of_2(m)
    # Keep the [BLOCK_M, BLOCK_N, BLOCK_G] accumulator across tiles while it is <= 32 registers a thread.
    acc3 = bm * bn * bg <= 32 * 32 * kw.get("num_warps", 4)
    w32 = as_pairs(values)
    kern = _sparse24_stream_kernel[(triton.cdiv(n, bn), split)]
    common = dict(EXPAND=bool(expand), ACC3=acc3, BLOCK_M=bm, BLOCK_N=bn, BLOCK_G=bg, **kw)
    has_bias, swn, smn = bias is not None, w32.stride(0), meta.stride(0)
    if split == 1:
        b = bias if has_bias else values

        def run(x2, sx, y):
            kern(x2, w32, meta, b, y, m, n, g, g_per_split, sx, swn, smn, n, 0, HAS_BIAS=has_bias, SPLIT_K=1,
                 **common)
        return run
    reduce = reduce_kernel[(triton.cdiv(m * n, 1024),)]

    def run_split(x2, sx, y):
        part = torch.empty(split, m, n, device=y.device, dtype=torch.float32)
        kern(x2, w32, meta, values, part, m, n, g, g_per_split, sx, swn, smn, n, m * n, HAS_BIAS=False,
             SPLIT_K=split, **common)
        reduce(part, bias if has_bias else part, y, m * n, n, SPLIT_K=split, HAS_BIAS=has_bias, BLOCK=1024)
    return run_split
