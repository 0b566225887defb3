"""Triton 8-bit 2:4 streaming decode kernel on CUDA cores (kind ``stream-select`` of backend ``decode8``), M <= 2.

The 8-bit 2:4 weight moves 2.5 bytes per 4 weights, so at M = 1 the kernel has about half the issue slots per
weight group that the 16-bit select kernel (:mod:`._decode_stream`) has, and everything that does not feed an
FMA is kept out of its loop. Each program owns BLOCK_N output rows and walks K in tiles of BLOCK_Q quads (two
2:4 groups, 8 input columns):

* per row, the tile's 8-bit values as one int32 per quad (its two groups' kept values: 16-byte loads, full
  tiles carry no per-column mask) and the quad's metadata byte, loaded 4 bytes a thread so the bytes land in
  the values' registers (``_four_byte_aligned``); x as its 8 per-quad columns ``[BLOCK_M, BLOCK_Q]`` (L1/L2
  resident). Loads are issued one tile ahead (register double buffering);
* FP8 e4m3 values become fp16 pairs: on GPUs with FP8 conversions by ``cvt.rn.f16x2.e4m3x2`` (one instruction
  per group), elsewhere by moving their sign, exponent and mantissa bits into fp16 fields (exact, subnormals
  included; the value comes out times 2^-8, folded into the scale). INT8 values are sign-extended and
  converted. Then fp32 math as in the 16-bit select kernel: the nibble's bits pick each kept value's x column
  with two ``where``, 2 FMAs per group and x row;
* one scale per output channel, applied once to the accumulator (with the 2^-8 fold); the output (+ bias) is
  stored directly with SPLIT_K = 1, else fp32 partials summed in a fixed order by the dot kernels' reduce.

Per-group scales are not read here: ``decode8`` runs those weights on its ``dot`` kernels.
Reference: :func:`llmprune_kernels.reference.sparse24_8bit.sparse24_8bit_linear_reference`.
"""
from __future__ import annotations

import torch

from llmprune_kernels.sparse24.backends._decode_dot import HAS_TRITON

MAX_M = 2  # above this the FMAs per group outgrow the tensor-core kernels' cost

if HAS_TRITON:
    import triton
    import triton.language as tl

    from llmprune_kernels.sparse24.backends._decode_stream import _store_rows, _stream_start

    @triton.jit
    def _four_byte_aligned(offs, k_end):
        """``offs`` seen by Triton as only 4-byte aligned, so a thread loads the 4 metadata bytes of its 4 value
        quads (one 16-byte load) and no re-layout is needed (see ``_decode_stream._two_byte_aligned``)."""
        return tl.where(k_end >= 0, offs, offs + 4)

    @triton.jit
    def _fp8_words(w, ASM: tl.constexpr):
        """(lo, hi): each int32 ``w``'s bytes (0, 1) and (2, 3) as int32 words of two fp16 (low byte in the low
        half). ``ASM``: the hardware conversion (exact values); else bit moves (the values times 2^-8)."""
        if ASM:
            lo, hi = tl.inline_asm_elementwise(
                asm="{ .reg .b16 a, b; mov.b32 {a, b}, $2; cvt.rn.f16x2.e4m3x2 $0, a; cvt.rn.f16x2.e4m3x2 $1, b; }",
                constraints="=r,=r,r", args=[w], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        else:
            # e4m3 bits s eeee mmm -> fp16 bits s 0 eeee mmm 0000000: sign to bit 15, the rest to bits 7-13.
            lo = ((w << 8) & 0x8000) | ((w << 7) & 0x3F80) | ((w << 16) & -2147483648) | ((w << 15) & 0x3F800000)
            hi = ((w >> 8) & 0x8000) | ((w >> 9) & 0x3F80) | (w & -2147483648) | ((w >> 1) & 0x3F800000)
        return lo, hi

    @triton.jit
    def _half(word, HIGH: tl.constexpr):
        """One fp16 of an int32 fp16-pair word, as fp32."""
        if HIGH:
            h = word >> 16
        else:
            h = word & 0xFFFF
        return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _codes4(w, FP8: tl.constexpr, ASM: tl.constexpr):
        """The 4 values of each quad word as fp32: group a (bytes 0, 1), group b (bytes 2, 3)."""
        if FP8:
            lo, hi = _fp8_words(w, ASM)
            a0 = _half(lo, False)
            a1 = _half(lo, True)
            b0 = _half(hi, False)
            b1 = _half(hi, True)
        else:  # int8: sign-extend each byte
            a0 = ((w << 24) >> 24).to(tl.float32)
            a1 = ((w << 16) >> 24).to(tl.float32)
            b0 = ((w << 8) >> 24).to(tl.float32)
            b1 = (w >> 24).to(tl.float32)
        return a0, a1, b0, b1

    @triton.jit
    def _select2(acc, v0, v1, t, x0, x1, x2, x3):
        """acc += one group's two kept values times their x columns (nibble t: i0 = bits 0-1, i1 = bits 2-3)."""
        acc += v0 * tl.where((t & 2) != 0, x2, tl.where((t & 1) != 0, x1, x0))
        acc += v1 * tl.where((t & 8) != 0, tl.where((t & 4) != 0, x3, x2), x1)
        return acc

    @triton.jit
    def _q8_stream_load(x_ptr, w_ptr, m_ptr, offs_m, M, rows, N, stride_xm, stride_wn, stride_mn, q0, q_end, K,
                        FULL: tl.constexpr, BLOCK_Q: tl.constexpr):
        """One tile: value quads (int32) and metadata bytes ``[1, BLOCK_N, BLOCK_Q]``, x columns 8 x
        ``[BLOCK_M, BLOCK_Q]``. ``FULL``: no mask along K (a dead tile masks whole rows); else per quad and,
        for x, per column (K may end inside the last quad)."""
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        q3 = offs_q[None, None, :]
        col = offs_q[None, :] * 8
        if FULL:
            live = q0 + BLOCK_Q <= q_end
            w_ok = rows < tl.where(live, N, 0)
            x_ok = (offs_m < tl.where(live, M, 0))[:, None]
        else:
            w_ok = (rows < N) & (q3 < q_end)
            x_ok = (offs_m < M)[:, None] & (offs_q[None, :] < q_end)  # columns 0-3 of a live quad lie in K
        w = tl.load(w_ptr + rows * stride_wn + q3, mask=w_ok, other=0)
        mb = tl.load(m_ptr + rows * stride_mn + _four_byte_aligned(q3, q_end), mask=w_ok, other=0).to(tl.int32)
        xp = x_ptr + offs_m[:, None] * stride_xm + col
        x0 = tl.load(xp, mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
        x1 = tl.load(xp + 1, mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
        x2 = tl.load(xp + 2, mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
        x3 = tl.load(xp + 3, mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
        if FULL:
            x4 = tl.load(xp + 4, mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
            x5 = tl.load(xp + 5, mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
            x6 = tl.load(xp + 6, mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
            x7 = tl.load(xp + 7, mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
        else:
            k_ok = x_ok & (col + 4 < K)  # K, a multiple of 4, may end after column 3 of the last quad
            x4 = tl.load(xp + 4, mask=k_ok, other=0.0).to(tl.float32)[:, None, :]
            x5 = tl.load(xp + 5, mask=k_ok, other=0.0).to(tl.float32)[:, None, :]
            x6 = tl.load(xp + 6, mask=k_ok, other=0.0).to(tl.float32)[:, None, :]
            x7 = tl.load(xp + 7, mask=k_ok, other=0.0).to(tl.float32)[:, None, :]
        return w, mb, x0, x1, x2, x3, x4, x5, x6, x7

    @triton.jit
    def _q8_stream_math(acc, w, mb, x0, x1, x2, x3, x4, x5, x6, x7, FP8: tl.constexpr, ASM: tl.constexpr):
        a0, a1, b0, b1 = _codes4(w, FP8, ASM)
        acc = _select2(acc, a0, a1, mb & 15, x0, x1, x2, x3)
        return _select2(acc, b0, b1, mb >> 4, x4, x5, x6, x7)

    @triton.jit
    def _sparse24_q8_stream_kernel(
        x_ptr, w_ptr, m_ptr, s_ptr, b_ptr, y_ptr,
        M, N, K, Q, Q_PER_SPLIT,
        stride_xm, stride_wn, stride_mn, stride_sn, stride_ym, stride_ys, POST,
        HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, FP8: tl.constexpr, ASM: tl.constexpr, ACC3: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr,
    ):
        """``w_ptr``: the 8-bit values viewed as int32, one per quad; ``POST``: the factor the conversion leaves
        (2^8 for FP8 bit moves, else 1), applied with the scale."""
        pid_k, offs_m, offs_n, m_ok, n_ok, rows, q_start, q_end, q_full = _stream_start(
            M, N, Q, Q_PER_SPLIT, BLOCK_M, BLOCK_N, BLOCK_Q)
        if K % 8 != 0:  # K ends inside the last quad: that quad goes to the masked tile
            q_full = tl.minimum(q_full, (Q - 1) // BLOCK_Q * BLOCK_Q)
        out = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if ACC3:
            acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_Q], dtype=tl.float32)
        w_n, mb_n, x0n, x1n, x2n, x3n, x4n, x5n, x6n, x7n = _q8_stream_load(
            x_ptr, w_ptr, m_ptr, offs_m, M, rows, N, stride_xm, stride_wn, stride_mn, q_start,
            q_full, K, True, BLOCK_Q)
        for q0 in range(q_start, q_full, BLOCK_Q):
            w, mb, x0, x1, x2, x3, x4, x5, x6, x7 = w_n, mb_n, x0n, x1n, x2n, x3n, x4n, x5n, x6n, x7n
            w_n, mb_n, x0n, x1n, x2n, x3n, x4n, x5n, x6n, x7n = _q8_stream_load(
                x_ptr, w_ptr, m_ptr, offs_m, M, rows, N, stride_xm, stride_wn, stride_mn, q0 + BLOCK_Q,
                q_full, K, True, BLOCK_Q)
            if ACC3:
                acc = _q8_stream_math(acc, w, mb, x0, x1, x2, x3, x4, x5, x6, x7, FP8, ASM)
            else:
                out += tl.sum(_q8_stream_math(tl.zeros([BLOCK_M, BLOCK_N, BLOCK_Q], dtype=tl.float32), w, mb,
                                              x0, x1, x2, x3, x4, x5, x6, x7, FP8, ASM), axis=2)
        if q_full < q_end:  # the ragged last tile
            w, mb, x0, x1, x2, x3, x4, x5, x6, x7 = _q8_stream_load(
                x_ptr, w_ptr, m_ptr, offs_m, M, rows, N, stride_xm, stride_wn, stride_mn, q_full, q_end, K, False,
                BLOCK_Q)
            if ACC3:
                acc = _q8_stream_math(acc, w, mb, x0, x1, x2, x3, x4, x5, x6, x7, FP8, ASM)
            else:
                out += tl.sum(_q8_stream_math(tl.zeros([BLOCK_M, BLOCK_N, BLOCK_Q], dtype=tl.float32), w, mb,
                                              x0, x1, x2, x3, x4, x5, x6, x7, FP8, ASM), axis=2)
        if ACC3:
            out += tl.sum(acc, axis=2)
        s = tl.load(s_ptr + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32) * POST
        out = out * s[None, :]
        _store_rows(out, y_ptr, b_ptr, pid_k, offs_m, offs_n, m_ok, n_ok, stride_ym, stride_ys, HAS_BIAS, SPLIT_K)


def as_quads(values: torch.Tensor) -> torch.Tensor:
    """The ``[out, in/2]`` 8-bit values as ``[out, ceil(in/8)]`` int32, one per quad (two 2:4 groups); copied
    (zero-padded to whole quads) where the view is not possible."""
    v = values.view(torch.uint8) if values.dtype == torch.float8_e4m3fn else values
    try:
        return v.view(torch.int32)
    except RuntimeError:  # in % 8 == 4, an odd storage offset or a non-contiguous row
        out, half = v.shape
        pad = torch.zeros(out, -(-half // 4) * 4, dtype=v.dtype, device=v.device)
        pad[:, :half] = v
        return pad.view(torch.int32)


def plan_stream8(q, bias, m, bn, bq, split, kw, asm, reduce_kernel):
    """Bind one 8-bit streaming launch for ``m`` rows of the per-channel 8-bit weight ``q``
    (:class:`~llmprune_kernels.sparse24.quant8.Packed24Q8`): returns ``run(x, sx, y)``."""
    if m > MAX_M or q.group_size is not None:
        raise ValueError(f"the 8-bit streaming decode kernel takes M <= {MAX_M} and per-channel scales, got M={m}, "
                         f"group_size={q.group_size}")
    n, k = q.shape
    fp8 = q.values.dtype == torch.float8_e4m3fn
    w32 = as_quads(q.values)
    nq = w32.shape[1]
    q_per_split = triton.cdiv(triton.cdiv(nq, split), bq) * bq
    split = triton.cdiv(nq, q_per_split)
    bm = triton.next_power_of_2(m)
    acc3 = bm * bn * bq <= 32 * 32 * kw.get("num_warps", 4)
    kern = _sparse24_q8_stream_kernel[(triton.cdiv(n, bn), split)]
    common = dict(FP8=fp8, ASM=bool(asm and fp8), ACC3=acc3, BLOCK_M=bm, BLOCK_N=bn, BLOCK_Q=bq, **kw)
    post = 256.0 if fp8 and not common["ASM"] else 1.0
    meta, scale = q.meta, q.scale
    has_bias, swn, smn, ssn = bias is not None, w32.stride(0), meta.stride(0), scale.stride(0)
    if split == 1:
        b = bias if has_bias else scale

        def run(x2, sx, y):
            kern(x2, w32, meta, scale, b, y, m, n, k, nq, q_per_split, sx, swn, smn, ssn, n, 0, post,
                 HAS_BIAS=has_bias, SPLIT_K=1, **common)
        return run
    reduce = reduce_kernel[(triton.cdiv(m * n, 1024),)]

    def run_split(x2, sx, y):
        part = torch.empty(split, m, n, device=y.device, dtype=torch.float32)
        kern(x2, w32, meta, scale, scale, part, m, n, k, nq, q_per_split, sx, swn, smn, ssn, n, m * n, post,
             HAS_BIAS=False, SPLIT_K=split, **common)
        reduce(part, bias if has_bias else part, y, m * n, n, SPLIT_K=split, HAS_BIAS=has_bias, BLOCK=1024)
    return run_split
