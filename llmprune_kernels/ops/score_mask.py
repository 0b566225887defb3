"""Fused score-and-mask: Wanda / GBLM / RIA scores and exact per-row top-k or N:M masks in one pass.

``score_and_mask`` reads W (and G for GBLM) once, computes the fp32 score exactly as the reference does,
maps it to an order-preserving int32 key and selects, equal bit for bit to ``mask_from_score`` (among
equal scores the lower column is pruned first). This module holds the API, the launchers and their
H100-tuned defaults; the kernels live in

* ``score_mask_common``: score, key, row reductions and output writes shared by all kernels;
* ``score_mask_hist``: the default unstructured select (``select="hist"``), a radix select by 8-bit
  histograms of the k-th key (rows up to ``HIST_MAX_BLOCK`` columns in registers), the histogram kept in
  shared memory through a few lines of PTX on CUDA (``score_mask_hist_smem``);
* ``score_mask_radix``: ``select="radix1"``, a bitwise radix search of the k-th key (one full-row count per
  key bit); its chunked kernel streams rows longer than ``MAX_BLOCK`` for every select;
* ``score_mask_nm``: N:M, the rank of each element inside its group of M.

Cost on H100 (``benchmarks/results/score_mask.json``): N:M runs at 1.3-1.4x of a plain copy of the same
bytes; the unstructured hist select at 1.2-1.5x of that copy (radix1: 6-11x). Outputs: a bool mask,
and/or packed bits (bit i of byte b = column 8b+i, numpy ``bitorder='little'``), and/or W zeroed in place.
Where Triton cannot run (no Triton, or a CPU tensor without ``TRITON_INTERPRET=1``), ``score_and_mask``
computes the same outputs with the plain-PyTorch reference.
"""
from __future__ import annotations

import math
import os

import torch

from llmprune_kernels.ops.score_mask_common import HAS_TRITON
from llmprune_kernels.reference.gblm import gblm_score
from llmprune_kernels.reference.ria import ria_factor, ria_score, ria_sums
from llmprune_kernels.reference.wanda import mask_from_score, wanda_score
from llmprune_kernels.validation import (
    SparsityConfig,
    check_config,
    check_finite,
    check_finite_nonnegative,
    check_nm,
    check_weight,
)

if HAS_TRITON:
    import triton
    from triton.runtime.errors import OutOfResources

    from llmprune_kernels.ops.score_mask_hist import _rows_hist_kernel
    from llmprune_kernels.ops.score_mask_hist_smem import MM_PACK
    from llmprune_kernels.ops.score_mask_nm import _nm_kernel
    from llmprune_kernels.ops.score_mask_radix import (
        _row_topk_chunked_kernel,
        _rows_kernel,
    )

__all__ = ["HAS_TRITON", "INTERPRET", "pack_mask_bits", "score_and_mask", "triton_usable", "unpack_mask_bits"]

# Read once, like Triton itself: kernels decorated without it cannot take CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_BLOCK = 32768  # longest row kept in registers; longer rows use the chunked kernel
CHUNK = 4096
FLOAT_COMPARE = True  # count with fp32 compares where a row's scores are finite (see _tile_select)
# Launch defaults of the radix1 in-register kernel, measured best on the H100:
ROWS_PER_PROG = 1  # rows per program
ROW_ELEMS_PER_WARP = 2048  # a row gets one warp per this many (padded) columns: 64 keys per thread
DIGIT_BITS = 1  # radix bits per dependent step of the high-half search (2: fewer steps, 1.5x the compares)
PAIRWISE_MAX_BLOCK = 16384  # rank the bucket's keys pairwise (not 16 more search steps) up to this row width
# Unstructured selection: "hist" = histogram radix select (_rows_hist_kernel, the default), "radix1" =
# bitwise search (_rows_kernel); ``_tune={"select": ...}`` picks one per call.
SELECTS = ("radix1", "hist")
SELECT = "hist"
HIST_ELEMS_PER_WARP = 1024  # hist: a row gets one warp per this many (first-piece) columns; twice that past 8192
# hist: register cap by keys per thread, so that more rows fit on an SM (H100: 4096 columns 0.044 -> 0.038 ms
# with 72; 11008 = 8192 + 4096 at 96 keys per thread 0.113 -> 0.101 with 168)
HIST_MAXNREG = {32: 72, 48: 128, 64: 128, 96: 168}
HIST_MAX_BLOCK = 32768  # hist up to this padded width (one row in registers); longer rows stream (chunked)
HIST_BITS0 = 8  # hist: radix digit of the first histogram level, over the row's key range (256 bins)
HIST_BITS = 8  # hist: radix digit of the next levels (256 bins): usually one more level leaves 1-2 keys
HIST_WARP_SCAN = True  # hist: every warp scans the 256 bins itself (no barrier after the counts)
HIST_ATOMIC_MINMAX = True  # hist on CUDA: the row's min and max by shared atomics (one barrier)
HIST_VEC = 4  # hist: elements per thread and memory access (coalesced f, W and mask accesses; see the kernel)
_MODES = {"wanda": 0, "gblm": 1, "ria": 2}


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
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).view(rows, (cols + pad) // 8, 8)
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
    skips the checks that the norms are finite and >= 0 and G finite (each costs a device sync; G's a pass
    over G).
    Where Triton cannot run on ``weight``'s device (see ``triton_usable``), the same outputs come from the
    plain-PyTorch reference.
    """
    check_weight(weight)
    config = check_config(config)
    rows, cols = weight.shape
    if act_norm_sq.shape != (cols,):
        raise ValueError(
            f"activation norms have shape {tuple(act_norm_sq.shape)}, expected ({cols},) for weight {tuple(weight.shape)}"
        )
    if grad is not None and ria:
        raise ValueError("give either grad (GBLM) or ria=True, not both")
    if check:
        check_finite_nonnegative(act_norm_sq, "activation norms")
    if grad is not None:
        if grad.shape != weight.shape:
            raise ValueError(
                f"gradient norms have shape {tuple(grad.shape)}, expected the weight's shape {tuple(weight.shape)}"
            )
        if grad.dtype not in _PROMO:
            raise TypeError(f"gradient norms have dtype {grad.dtype}; allowed: float16, bfloat16, float32, float64")
        if check:
            check_finite(grad, "gradient norms")
    if config.is_nm:
        check_nm(config.n, config.m, cols)
    if not triton_usable(weight.device):
        return _reference_score_and_mask(weight, act_norm_sq, config, grad, ria, ria_alpha, inplace, mask, packed)
    tune = _tune or {}
    dev = weight.device
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    mode, gpromo = _MODES["wanda"], 0
    g = rs = cs = w  # placeholders for pointers a mode does not read
    if grad is not None:
        g = grad.to(dev)
        g = g if g.stride(1) == 1 else g.contiguous()
        mode, gpromo = _MODES["gblm"], _PROMO[torch.promote_types(weight.dtype, grad.dtype)]
    if ria:
        mode = _MODES["ria"]
        rs, cs = ria_sums(w)
        f = ria_factor(act_norm_sq.to(dev), ria_alpha).contiguous()
    else:
        f = torch.sqrt(act_norm_sq.to(dev).float()).contiguous()  # the reference's exact fp32 factor
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


@torch.no_grad()
def _reference_score_and_mask(weight, act_norm_sq, config, grad, ria, ria_alpha, inplace, mask, packed):
    """``score_and_mask`` where the Triton kernels cannot run (no Triton, or a CPU tensor without
    ``TRITON_INTERPRET=1``): the reference score and selection, with the same outputs."""
    dev = weight.device
    norm = act_norm_sq.to(dev)
    if grad is not None:
        score = gblm_score(weight, norm, grad.to(dev))
    elif ria:
        score = ria_score(weight, norm, ria_alpha)
    else:
        score = wanda_score(weight, norm)
    out = mask_from_score(score, config)
    bits = pack_mask_bits(out) if packed else None
    if inplace:
        weight.masked_fill_(out, 0)
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


def _scratch(rows: int, rows_per_prog: int, cap: int, device) -> torch.Tensor:
    """Per-row int32 buffers for compacted keys, one per row of every program (the last one may be partial)."""
    return torch.empty(triton.cdiv(rows, rows_per_prog) * rows_per_prog * max(cap, 1), dtype=torch.int32,
                       device=device)


def _rows_config(cols: int, element_size: int, tune: dict) -> dict:
    """Launch parameters of an unstructured select for rows of ``cols`` columns (all but pointers and flags).

    ``kernel``, ``rows_per_prog``, scratch ``cap`` per row, padded ``block``, the selection ``consts``
    (constexprs) and ``num_warps``; ``chunked`` when the row is streamed. Shared with tools/sass_score_mask.py
    so that static costs are those of the real launch.
    """
    select = tune.get("select", SELECT)
    if select not in SELECTS:
        raise ValueError(f"select={select!r}; allowed: {', '.join(map(repr, SELECTS))}")
    max_block = tune.get("max_block", MAX_BLOCK)
    block = max(16, _next_pow2(cols))
    if block > max_block:  # stream the row in chunks
        block = min(tune.get("chunk", CHUNK), max_block)
        cap = tune.get("cap", 512)
        return dict(kernel=_row_topk_chunked_kernel, chunked=True, rows_per_prog=1, cap=cap, block=block,
                    consts=dict(BLOCK=block, CAP=cap), num_warps=tune.get("num_warps", 8))
    if select == "hist" and block <= min(max_block, tune.get("hist_max_block", HIST_MAX_BLOCK)):
        # a row as one power-of-two piece, or two (the largest power of two <= cols, then the rest padded)
        # when that pads less: 11008 -> 8192 + 4096 instead of 16384
        def hist_warps(b1: int, b2: int) -> int:
            epw = tune.get("elems_per_warp", HIST_ELEMS_PER_WARP if b1 + b2 <= 8192 else 2 * HIST_ELEMS_PER_WARP)
            return tune.get("num_warps", max(1, min(32, b1 // epw)))

        b1 = block if block == cols or not tune.get("split", True) else max(16, block // 2)
        b2 = 0 if b1 >= cols else _next_pow2(cols - b1)
        warps = hist_warps(b1, b2)
        if b2 and (b1 + b2 >= block or b2 < 32 * warps):  # no saving, or a piece smaller than the threads
            b1, b2 = block, 0
            warps = hist_warps(b1, b2)
        bits0, bits = tune.get("bits0", HIST_BITS0), tune.get("bits", HIST_BITS)
        # the PTX shared-memory histogram (CUDA) has 1024 counters and needs no replicated keys (a key per thread)
        asm = tune.get("asm", not INTERPRET and max(bits0, bits) <= 10 and min(b1, b2 or b1) >= 32 * warps)
        keys_per_thread = (b1 + b2) // (32 * warps)
        maxnreg = tune.get("maxnreg", HIST_MAXNREG.get(keys_per_thread))
        return dict(kernel=_rows_hist_kernel, chunked=False, rows_per_prog=1, cap=0, block=b1 + b2,
                    consts=dict(BLOCK=b1, B2=b2, BITS0=bits0, BITS=bits, ASM=asm, NT=32 * warps, EVEN=b1 <= cols,
                                WSCAN=tune.get("wscan", HIST_WARP_SCAN) and bits0 == bits == 8,
                                AMM=asm and tune.get("amm", HIST_ATOMIC_MINMAX)
                                and all(b % (32 * warps * MM_PACK) == 0 for b in (b1, b2)),
                                VEC=tune.get("vec", HIST_VEC)),
                    num_warps=warps, options={"maxnreg": maxnreg} if maxnreg and not INTERPRET else {})
    c = min(block, 32 * (16 // element_size))  # one warp's lanes, 16-byte loads each
    wpr = tune.get("warps_per_row", max(1, block // ROW_ELEMS_PER_WARP))
    r = tune.get("rows_per_prog", ROWS_PER_PROG)
    pair = tune.get("pair", block <= PAIRWISE_MAX_BLOCK)
    cap = tune.get("cap", (64 if block <= 4096 else 128 if block <= 16384 else 256) if pair else 128)
    cap = max(cap, 32) if pair else cap  # the pairwise ranking reads the bucket 32 keys at a time
    return dict(kernel=_rows_kernel, chunked=False, rows_per_prog=r, cap=cap, block=block,
                consts=dict(W=block // c, R=r, C=c, CAP=cap, FLOAT=tune.get("float", FLOAT_COMPARE),
                            DIGIT=tune.get("digit", DIGIT_BITS), PAIR=pair),
                num_warps=tune.get("num_warps", r * wpr))


def _launch_rows(w, g, f, cs, rs, out, bits, k, flags, tune):
    """Unstructured: rows in registers (``select`` hist or radix1), or streamed in chunks when too long."""
    rows, cols = w.shape
    cfg = _rows_config(cols, w.element_size(), tune)
    ptrs = (w, g, f, cs, rs, out, bits)
    strides = (w.stride(0), g.stride(0), out.stride(0), bits.stride(0))
    r = cfg["rows_per_prog"]
    if cfg["chunked"]:
        cfg["kernel"][(rows,)](*ptrs, _scratch(rows, 1, cfg["cap"], w.device), cols, k, *strides, **cfg["consts"],
                               num_warps=cfg["num_warps"], **flags)
        return
    try:
        cfg["kernel"][(triton.cdiv(rows, r),)](*ptrs, _scratch(rows, r, cfg["cap"], w.device), rows, cols, k,
                                               *strides, **cfg["consts"], num_warps=cfg["num_warps"], **flags,
                                               **cfg.get("options", {}))
    except OutOfResources:  # raised before anything runs (compile/launch): stream the row instead
        if "max_block" in tune:
            raise
        _launch_rows(w, g, f, cs, rs, out, bits, k, flags, {**tune, "max_block": cfg["block"] // 2})


def _launch_nm(w, g, f, cs, rs, out, bits, config, flags, tune):
    rows, cols = w.shape
    mp, bg, br, _ = _nm_tile(config, cols, tune)
    grid = (triton.cdiv(rows, br), triton.cdiv(cols // config.m, bg))
    _nm_kernel[grid](w, g, f, cs, rs, out, bits, rows, cols, w.stride(0), g.stride(0), out.stride(0), bits.stride(0),
                     N=config.n, M=config.m, MP=mp, BR=br, BG=bg, num_warps=tune.get("num_warps", 4), **flags)
