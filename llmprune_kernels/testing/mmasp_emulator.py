"""CPU emulator of the mma.sp 2:4 decode kernel (``csrc/sparse24/mmasp_kernel.cuh``), lane by lane.

It reads the fragment-order buffers of :mod:`llmprune_kernels.sparse24.backends.mmasp` exactly as each lane of
the kernel does (same offsets, same ``ldmatrix`` addresses, same split-K ranges and epilogue rows) and
applies the documented PTX semantics of ``mma.sp::ordered_metadata.m16n8k32`` (f16 / bf16):

* A (sparse, 16x32 stored as 16x16): lane ``L = 4g + t`` holds a0..a7; element i sits in row
  ``g + 8 * ((i // 2) % 2)`` and compressed column ``2t + i % 2 + 8 * (i // 4)``; compressed columns 2j and
  2j+1 are the two kept values of group j (input columns 4j..4j+3), in column order.
* Metadata: with sparsity selector ``sel`` the lanes ``t = 2*sel`` (columns 0..15) and ``t = 2*sel + 1``
  (columns 16..31) of each quad g supply it: bits ``[0, 16)`` row g, bits ``[16, 32)`` row g+8, 4 bits a
  group (lower index in the low 2 bits), lower columns in lower bits.
* B (32x8): lane element i is ``B[2t + i % 2 + 8 * (i // 2), g]``.  D: element i is
  ``D[g + 8 * (i // 2), 2t + i % 2]``.
* ``ldmatrix.x4``: lane ``8j + r`` gives the address of row r of matrix j; lane ``(g, t)`` receives
  elements ``2t, 2t+1`` of row g of matrix j in register j.

The result must equal ``x @ W.T`` (tests); on the GPU, ``probe_check`` compares one hardware ``mma.sp``
with :func:`mma_sp_m16n8k32` to locate a layout error.
"""
from __future__ import annotations

import math

import torch

from llmprune_kernels.sparse24.backends.mmasp import CHUNK, KSTEP, MAX_M, ROWS, MmaspLayout, check_config, padded_dims

_LANE = torch.arange(32)
_G, _T = _LANE // 4, _LANE % 4
_I = torch.arange(8)


def _a_tables():
    """Per (lane, element): dense row, group (0..7), slot (0/1 = lower/higher kept index), provider lane and
    the metadata bit offset, for selector 0 (selector 1 adds 2 to the provider lane)."""
    reg = _I // 2
    row = _G[:, None] + 8 * (reg % 2)[None, :]
    ccol = 2 * _T[:, None] + (_I % 2)[None, :] + 8 * (reg // 2)[None, :]
    group, slot = ccol // 2, ccol % 2
    provider = 4 * _G[:, None] + group // 4
    offset = 16 * (row >= 8).long() + 4 * (group % 4) + 2 * slot
    return row, group, slot, provider, offset


_A_ROW, _A_GROUP, _A_SLOT, _A_PROVIDER, _A_OFFSET = _a_tables()
_B_K = 2 * _T[:, None] + (_I % 2)[None, :] + 8 * (_I // 2)[None, :]  # [32, 8]
_B_N = _G[:, None].expand(32, 8)
_D_ROW = _G[:, None] + 8 * (torch.arange(4) // 2)[None, :]  # [32, 4]
_D_COL = 2 * _T[:, None] + (torch.arange(4) % 2)[None, :]


def mma_sp_m16n8k32(a: torch.Tensor, b: torch.Tensor, e: torch.Tensor, sel: int) -> torch.Tensor:
    """One warp's ``mma.sp.m16n8k32`` (zero accumulator), batched over leading dims.

    a, b: ``[..., 32, 8]`` per-lane register elements (any float dtype); e: ``[..., 32]`` integer metadata
    words (uint32 bit patterns); returns d ``[..., 32, 4]`` fp32. Raises on metadata the PTX ISA calls
    undefined (two equal indices in a group)."""
    lead = a.shape[:-2]
    e = e.to(torch.int64) & 0xFFFFFFFF
    words = e[..., _A_PROVIDER + 2 * sel]  # [..., 32, 8]
    idx = (words >> _A_OFFSET) & 3
    # Every (row, group) is covered by two elements of one lane: slots 0 and 1 must differ.
    pair = idx.reshape(*lead, 32, 4, 2)
    if bool((pair[..., 0] == pair[..., 1]).any()):
        raise ValueError("mma.sp metadata holds a group with two equal indices (undefined in PTX)")
    kcol = 4 * _A_GROUP + idx
    flat = (_A_ROW * 32 + kcol).reshape(*lead, 256)
    dense = torch.zeros(*lead, 16 * 32, dtype=torch.float32)
    dense.scatter_(-1, flat, a.reshape(*lead, 256).float())
    dense = dense.reshape(*lead, 16, 32)
    bd = torch.zeros(*lead, 32, 8, dtype=torch.float32)
    bd[..., _B_K.reshape(-1), _B_N.reshape(-1)] = b.reshape(*lead, 256).float()
    d = dense @ bd  # [..., 16, 8]
    return d[..., _D_ROW, _D_COL]


def ldmatrix_x4(smem: torch.Tensor, addr: torch.Tensor) -> torch.Tensor:
    """``ldmatrix.x4`` from a flat shared-memory tensor: ``addr [..., 32]`` element offsets (lane 8j + r: row
    r of matrix j); returns ``[..., 32, 8]`` (lane (g, t), register j: elements 2t, 2t+1 of row g of j)."""
    rowaddr = addr[..., (8 * torch.arange(4))[None, :] + _G[:, None]]  # [..., 32, 4]: lane, matrix j
    off = rowaddr[..., None] + 2 * _T[:, None, None] + torch.arange(2)  # [..., 32, 4, 2]
    return smem[off].reshape(*addr.shape[:-1], 32, 8)


def emulate_mmasp_linear(x: torch.Tensor, layout: MmaspLayout, bias: torch.Tensor | None = None,
                         config: tuple[int, int, int] = (8, 1, 1), row_scale: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """What the CUDA kernel computes for ``x [M, in]`` (M <= 16) with launch config
    ``(warps, rows_per_warp, splits)``: same loads, MMAs (fp32), split ranges and epilogue. ``row_scale [out]``:
    the 8-bit kernel's per-row scale, applied to each split's fp32 partial before the sum (``layout`` then holds
    the widened registers: :func:`llmprune_kernels.sparse24.backends.mmasp8.widened_a_frag`)."""
    warps, rpw, splits = check_config(config)
    out, inp = layout.shape
    m = x.shape[0]
    if not 1 <= m <= MAX_M or x.shape[1] != inp:
        raise ValueError(f"x must be [1..{MAX_M}, {inp}], got {tuple(x.shape)}")
    rb, nc = padded_dims(out, inp)
    nt = 1 if m <= 8 else 2
    kslice = math.ceil(nc / splits)  # chunks of x in shared memory
    stride = kslice * CHUNK + 8  # x row stride in shared memory (conflict-free ldmatrix)
    a_frag = layout.a_frag
    e_frag = layout.e_frag.to(torch.int64) & 0xFFFFFFFF
    lane = _LANE
    partial = torch.zeros(splits, rb, nt, 32, 4)
    for s in range(splits):
        c0, c1 = s * nc // splits, (s + 1) * nc // splits
        # x slice in shared memory: rows n < M, columns [c0*256, c1*256) that lie inside K, zero elsewhere.
        xs = torch.zeros(nt * 8 * stride, dtype=x.dtype)
        k_lo, k_hi = c0 * CHUNK, min(c1 * CHUNK, inp)
        for n in range(m):
            if k_hi > k_lo:
                xs[n * stride: n * stride + k_hi - k_lo] = x[n, k_lo:k_hi]
        if c1 == c0:
            continue
        steps = torch.arange(c0 * 8, c1 * 8)  # global k-steps of this split
        kl = (steps - c0 * 8) * KSTEP  # column of the k-step inside the x slice
        for parity in (0, 1):
            st, klp = steps[parity::2], kl[parity::2]
            a = a_frag[:, st]  # [rb, ns, 32, 8]
            word = ((st % 8) // 2).reshape(1, -1, 1, 1).expand(rb, -1, 32, 1)  # w = (k-step % 8) // 2
            e = torch.gather(e_frag[:, st // 8], 3, word)[..., 0]  # [rb, ns, 32]
            for j in range(nt):
                addr = (j * 8 + lane % 8)[None, :] * stride + klp[:, None] + 8 * (lane // 8)[None, :]
                b = ldmatrix_x4(xs, addr)  # [ns, 32, 8]
                d = mma_sp_m16n8k32(a, b.expand(rb, *b.shape), e, parity)
                partial[s, :, j] += d.sum(dim=1)
    # Epilogue: per CTA tile, each split writes its rows x (nt*8) fp32 tile; cluster rank q sums the
    # splits (in order) for rows [q*rows/S, (q+1)*rows/S) of the tile and stores y.
    rows_cta = warps * rpw * ROWS
    tiles = math.ceil(rb / (warps * rpw))
    y = torch.zeros(m, out, dtype=torch.float32)
    written = torch.zeros(m, out, dtype=torch.int64)
    tile_part = torch.zeros(splits, tiles * rows_cta, nt * 8)
    blk = torch.arange(rb)
    for j in range(nt):
        for r in range(4):
            rows = blk[:, None] * ROWS + _D_ROW[None, :, r]  # [rb, 32]
            cols = j * 8 + _D_COL[None, :, r].expand(rb, 32)
            tile_part[:, rows, cols] = partial[:, :, j, :, r]
    bvals = bias.float() if bias is not None else None
    for bx in range(tiles):
        for q in range(splits):
            r0, r1 = q * rows_cta // splits, (q + 1) * rows_cta // splits
            for row in range(r0, r1):
                grow = bx * rows_cta + row
                if grow >= out:
                    continue
                acc = torch.zeros(m)
                scale = 1.0 if row_scale is None else float(row_scale[grow])
                for s in range(splits):
                    acc += tile_part[s, grow, :m] * scale
                if bvals is not None:
                    acc += bvals[grow]
                y[:, grow] = acc
                written[:, grow] += 1
    if not bool((written == 1).all()):
        raise AssertionError(f"epilogue wrote some outputs {int(written.min())}..{int(written.max())} times")
    return y.to(x.dtype)


def probe_inputs(dtype: torch.dtype, seed: int = 0) -> dict:
    """Random registers for one ``mma.sp`` (valid, ordered metadata) as int32 bit patterns, for the GPU probe."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(32, 8, generator=gen).to(dtype)
    b = torch.randn(32, 8, generator=gen).to(dtype)
    pairs = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
    pick = pairs[torch.randint(0, 6, (32, 8), generator=gen)]
    nib = pick[..., 0] | (pick[..., 1] << 2)  # [32, 8] nibbles, 8 per word
    words = (nib << (4 * torch.arange(8))).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return {"a": a, "b": b, "e": words}


def regs_as_int32(v: torch.Tensor) -> torch.Tensor:
    """``[32, 8]`` 16-bit lane elements -> ``[32, 4]`` int32 registers (element 2i in the low half)."""
    return v.contiguous().view(torch.int32).reshape(32, 4)
