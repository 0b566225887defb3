"""2:4 decode matmul on the sparse tensor cores (``mma.sp``), CUDA C++ in ``csrc/sparse24/`` (kernel:
``mmasp_kernel.cuh``).

``y = x @ W.T (+ bias)`` for small M (decode, M <= 16) with W 2:4-sparse fp16 / bf16. Roles are swapped:
the weight is the sparse A operand of ``mma.sp.m16n8k32`` (16 output features per MMA), x^T is B (tokens
are the MMA's N: one n8 MMA for M <= 8, two for M <= 16), fp32 accumulation.

The packed weight (:mod:`llmprune_kernels.sparse24.pack`) is re-laid out once into *fragment order* so the
kernel streams it with coalesced 16-byte loads and no index math:

* ``a_frag [ceil(out/16), Kp/32, 32, 8]`` (weight dtype), ``Kp`` = in_features rounded up to 256: for row
  block b, k-step s (32 input columns = groups 8s..8s+7 of 4) and lane ``L = 4g + t`` the 8 values of the
  lane's four A registers: reg ``2*gh + rh`` holds the two kept values of row ``16b + g + 8rh``, group
  ``8s + 4gh + t`` (PTX sparse A fragment: rows g / g+8, compressed columns 2t / 2t+8). One 16-byte load a
  lane a k-step; a warp's k-step is 512 contiguous bytes.
* ``e_frag [ceil(out/16), Kp/256, 32, 4]`` (int32 bit patterns of the uint32 metadata words): for 256-column
  chunk c, lane ``L = 4g + t``, word w: k-step ``s = 8c + 2w + (t >> 1)`` (the MMA of an even k-step reads
  the words of lanes t = 0, 1 with sparsity selector 0, an odd one those of t = 2, 3 with selector 1), half
  ``h = t & 1``: bits ``4j..4j+3`` = nibble of row ``16b + g``, group ``8s + 4h + j``; bits ``16+4j..`` =
  the same for row ``16b + g + 8``. One 16-byte load a lane every 8 k-steps.
* The nibble is ours (``i0 | i1 << 2``, ``i0 < i1``): PTX's metadata encoding, ordered as
  ``mma.sp::ordered_metadata`` requires. Padding (rows to 16, columns to 256) holds zeros with nibble 0b0100.

``from_mmasp_layout`` is the exact inverse. :mod:`llmprune_kernels.testing.mmasp_emulator` emulates the
kernel lane by lane on the CPU (the oracle for this layout); ``mmasp_linear`` calls the CUDA op.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmprune_kernels import _ext
from llmprune_kernels.sparse24.backends.base import Backend
from llmprune_kernels.sparse24.pack import Packed24, meta_indices, meta_width

ROWS = 16  # output features per MMA (row block)
KSTEP = 32  # input columns per MMA
CHUNK = 256  # input columns per metadata load (8 k-steps)
MAX_M = 16  # two n8 MMAs
PAD_NIBBLE = 0b0100  # kept indices (0, 1): a valid ordered nibble for padded groups (their values are 0)
WARPS = (4, 8)
ROWS_PER_WARP = (1, 2)
SPLITS = (1, 2, 4, 8)  # split-K CTAs of one thread-block cluster (8 = portable cluster limit)


@dataclass
class MmaspLayout:
    """A 2:4 weight in fragment order (see the module docstring); ``shape`` is the dense (out, in)."""

    a_frag: torch.Tensor  # [ceil(out/16), Kp/32, 32, 8], weight dtype
    e_frag: torch.Tensor  # [ceil(out/16), Kp/256, 32, 4], int32
    shape: tuple[int, int]

    @property
    def dtype(self) -> torch.dtype:
        return self.a_frag.dtype

    def to(self, *args, **kwargs) -> "MmaspLayout":
        a = self.a_frag.to(*args, **kwargs)
        return MmaspLayout(a, self.e_frag.to(device=a.device), self.shape)

    def nbytes(self) -> int:
        return self.a_frag.numel() * self.a_frag.element_size() + self.e_frag.numel() * 4


def padded_dims(out_features: int, in_features: int) -> tuple[int, int]:
    """(row blocks of 16, 256-column chunks) of the padded weight."""
    return math.ceil(out_features / ROWS), math.ceil(in_features / CHUNK)


def check_shape(shape: tuple[int, int]) -> None:
    out, inp = shape
    if inp % 4 or inp <= 0 or out <= 0:
        raise ValueError(f"mma.sp layout needs in_features a positive multiple of 4 and out_features > 0, got {(out, inp)}")


def _check_packed(packed: Packed24) -> None:
    check_shape(packed.shape)
    out, inp = packed.shape
    if packed.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"mma.sp runs float16 or bfloat16 weights, got {packed.dtype}")
    if tuple(packed.values.shape) != (out, inp // 2) or tuple(packed.meta.shape) != (out, meta_width(inp)):
        raise ValueError(f"packed values {tuple(packed.values.shape)} / meta {tuple(packed.meta.shape)} do not match shape {(out, inp)}")


@torch.no_grad()
def to_mmasp_layout(packed: Packed24) -> MmaspLayout:
    """Re-lay out a :class:`Packed24` into fragment order (one-time, any device)."""
    _check_packed(packed)
    return MmaspLayout(frag_values(packed.values, packed.shape), frag_meta(packed.meta, packed.shape), packed.shape)


def frag_values(values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``a_frag [ceil(out/16), Kp/32, 32, 8]``: the kept values ``[out, in/2]`` (any dtype) in fragment order,
    zero-padded."""
    out, inp = shape
    rb, nc = padded_dims(out, inp)
    vals = torch.zeros(rb * ROWS, nc * CHUNK // 4, 2, dtype=values.dtype, device=values.device)
    vals[:out, : inp // 4] = values.reshape(out, inp // 4, 2)
    ks = nc * CHUNK // KSTEP
    # row = 16b + 8rh + g, group = 8s + 4gh + t  ->  [b, s, lane = 4g + t, reg = 2gh + rh, slot]
    v = vals.reshape(rb, 2, 8, ks, 2, 4, 2).permute(0, 3, 2, 5, 4, 1, 6)
    return v.reshape(rb, ks, 32, 8).contiguous()


def frag_meta(meta: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``e_frag [ceil(out/16), Kp/256, 32, 4]`` int32: the 2:4 metadata as the kernel's metadata words."""
    out, inp = shape
    rb, nc = padded_dims(out, inp)
    dev = meta.device
    idx = meta_indices(meta, inp)  # [out, G, 2] int64
    nib = torch.full((rb * ROWS, nc * CHUNK // 4), PAD_NIBBLE, dtype=torch.int64, device=dev)
    nib[:out, : inp // 4] = idx[..., 0] | (idx[..., 1] << 2)
    # group = 64c + 16w + 8sel + 4h + j, lane t = 2sel + h; bits 16rh + 4j
    n = nib.reshape(rb, 2, 8, nc, 4, 2, 2, 4).permute(0, 3, 2, 5, 6, 4, 1, 7)  # b c g sel h w rh j
    shift = (16 * torch.arange(2, device=dev)[:, None] + 4 * torch.arange(4, device=dev)[None, :])
    words = (n << shift).sum(dim=(-2, -1))  # [b, c, g, sel, h, w], < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(rb, nc, 32, 4).contiguous()


def _check_layout(layout: MmaspLayout) -> tuple[int, int, int, int]:
    out, inp = layout.shape
    rb, nc = padded_dims(out, inp)
    if tuple(layout.a_frag.shape) != (rb, nc * CHUNK // KSTEP, 32, 8):
        raise ValueError(f"a_frag has shape {tuple(layout.a_frag.shape)}; expected {(rb, nc * 8, 32, 8)} for {(out, inp)}")
    if layout.e_frag.dtype != torch.int32 or tuple(layout.e_frag.shape) != (rb, nc, 32, 4):
        raise ValueError(f"e_frag has shape {tuple(layout.e_frag.shape)} and dtype {layout.e_frag.dtype}; "
                         f"expected {(rb, nc, 32, 4)} int32 for {(out, inp)}")
    return out, inp, rb, nc


def layout_nibbles(layout: MmaspLayout) -> torch.Tensor:
    """The padded weight's metadata nibbles ``[rb*16, nc*64]`` (int64) decoded from ``e_frag``."""
    _, _, rb, nc = _check_layout(layout)
    w = layout.e_frag.to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(rb, nc, 8, 2, 2, 4)  # b c g sel h w
    shift = (16 * torch.arange(2, device=w.device)[:, None] + 4 * torch.arange(4, device=w.device)[None, :])
    n = (w[..., None, None] >> shift) & 0xF  # b c g sel h w rh j
    return n.permute(0, 6, 2, 1, 5, 3, 4, 7).reshape(rb * ROWS, nc * 64)


@torch.no_grad()
def from_mmasp_layout(layout: MmaspLayout) -> Packed24:
    """Exact inverse of :func:`to_mmasp_layout`."""
    out, inp, rb, nc = _check_layout(layout)
    ks = nc * CHUNK // KSTEP
    v = layout.a_frag.reshape(rb, ks, 8, 4, 2, 2, 2).permute(0, 5, 2, 1, 4, 3, 6)  # b rh g s gh t slot
    vals = v.reshape(rb * ROWS, nc * 64, 2)[:out, : inp // 4].reshape(out, inp // 2).contiguous()
    nib = layout_nibbles(layout)[:out, : inp // 4]
    i0, i1 = nib & 3, nib >> 2
    if bool((i0 >= i1).any()):
        r, g = (int(t) for t in (i0 >= i1).nonzero()[0])
        raise ValueError(f"corrupt mma.sp metadata at row {r}, group {g}: nibble {int(nib[r, g]):#06b} is not ordered")
    if (inp // 4) % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))
    nib = nib.reshape(out, -1, 2)
    meta = (nib[..., 0] | (nib[..., 1] << 4)).to(torch.uint8).contiguous()
    return Packed24(vals, meta, (out, inp))


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration and the CUDA op
# ---------------------------------------------------------------------------------------------------------------

def _index(device: torch.device | int | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    return device if isinstance(device, int) else (torch.device(device).index or 0)


def available(device: torch.device | int | None = None) -> bool:
    """The CUDA op was compiled in (CUDA build of ``_C``), a GPU is visible and this build's code runs mma.sp
    there (sm_80 code or newer)."""
    if not (_ext.ext_with_cuda() and torch.cuda.is_available()):  # the schema is always defined (library.py)
        return False
    return _ext.ext_cuda_code_arch(_index(device)) >= 800


def max_splits(device: torch.device | int | None = None) -> int:
    """The most split-K CTAs a launch may use on ``device``: a cluster of 8 with sm_90 code, else 1 (code built
    for sm_80, also when it runs on a newer GPU, has no thread-block clusters)."""
    if not available(device):
        return 1
    return SPLITS[-1] if _ext.ext_cuda_code_arch(_index(device)) >= 900 else 1


def smem_limit(device: torch.device | int | None = None) -> int:
    """Bytes of shared memory one CTA may opt in to on ``device`` (sm_90: 227 KiB; A100: 163 KiB)."""
    if not (torch.cuda.is_available() and _ext.ext_with_cuda()):
        return SMEM_LIMIT
    props = torch.cuda.get_device_properties(_index(device))
    return int(getattr(props, "shared_memory_per_block_optin", SMEM_LIMIT))


def supports(dtype: torch.dtype, in_features: int) -> bool:
    """The op is built and can run a weight of this dtype and width (fp16 / bf16, width a multiple of 4)."""
    return available() and dtype in (torch.float16, torch.bfloat16) and in_features % 4 == 0


def check_config(config: tuple[int, int, int]) -> tuple[int, int, int]:
    warps, rpw, splits = (int(v) for v in config)
    if warps not in WARPS or rpw not in ROWS_PER_WARP or splits not in SPLITS:
        raise ValueError(f"mma.sp config (warps, rows_per_warp, splits) = {config}; allowed warps {WARPS}, "
                         f"rows_per_warp {ROWS_PER_WARP}, splits {SPLITS}")
    return warps, rpw, splits


SMEM_LIMIT = 227 * 1024  # bytes of shared memory a CTA may use on sm_90


def smem_bytes(m: int, in_features: int, config: tuple[int, int, int]) -> int:
    """Shared memory of one CTA (the x slice plus the fp32 partial tile), as the op computes it."""
    warps, rpw, splits = check_config(config)
    _, nc = padded_dims(16, in_features)
    nt = 1 if m <= 8 else 2
    stride = math.ceil(nc / splits) * 256 + 8
    xs = (nt * 8 * stride * 2 + 15) // 16 * 16
    return xs + warps * rpw * 16 * nt * 8 * 4


def config_fits(m: int, in_features: int, config: tuple[int, int, int],
                device: torch.device | int | None = None) -> bool:
    """The launch fits the GPU's shared memory and its code's split limit (checked here: an exception thrown
    by the C++ op can take the process down on some torch builds, so the op must never see a config it would
    refuse). ``device`` None: the limits of sm_90 code (227 KiB, clusters of up to 8)."""
    if device is None:
        return smem_bytes(m, in_features, config) <= SMEM_LIMIT
    return (check_config(config)[2] <= max_splits(device)
            and smem_bytes(m, in_features, config) <= smem_limit(device))


def default_config(out_features: int, in_features: int, m: int = 1, sms: int = 132,
                   max_split: int = SPLITS[-1]) -> tuple[int, int, int]:
    """(warps, rows_per_warp, splits): 8 warps of one row block; the fewest split-K CTAs (a cluster) that
    give at least two CTAs per SM, never more splits than 256-column chunks nor than ``max_split``."""
    rb, nc = padded_dims(out_features, in_features)
    warps, rpw = 8, 1
    tiles = math.ceil(rb / (warps * rpw))
    splits = 1
    while splits < min(SPLITS[-1], max_split) and tiles * splits < 2 * sms and splits * 2 <= nc:
        splits *= 2
    return warps, rpw, splits


def device_default_config(out_features: int, in_features: int, m: int,
                          device: torch.device | int | None = None) -> tuple[int, int, int]:
    """``default_config`` for ``device``: its SM count and split limit."""
    if not (torch.cuda.is_available() and _ext.ext_with_cuda()):
        return default_config(out_features, in_features, m)
    sms = torch.cuda.get_device_properties(_index(device)).multi_processor_count
    return default_config(out_features, in_features, m, sms=sms, max_split=max_splits(device))


def check_call(x: torch.Tensor, shape: tuple[int, int], what: str, op_ok: bool = True
               ) -> tuple[torch.Size, torch.Tensor]:
    """``(leading shape, x as [M, in])`` after the checks every mma.sp op's call shares: x's width, 1..16 rows in
    all, x on a GPU whose loaded code runs the op (``op_ok``: the op itself was compiled in)."""
    inp = shape[1]
    if x.shape[-1] != inp:
        raise ValueError(f"x has {x.shape[-1]} input features; the weight has {inp}")
    x2 = x.reshape(-1, inp)
    if not 1 <= x2.shape[0] <= MAX_M:
        raise ValueError(f"{what} takes 1..{MAX_M} rows, got {x2.shape[0]}")
    if not (x.is_cuda and op_ok and available(x.device)):
        raise RuntimeError(f"{what} needs the CUDA build of llmprune_kernels._C (sm_80 code or newer) and x on its "
                           f"GPU; x is on {x.device}")
    return x.shape[:-1], x2


def resolve_call_config(config: tuple[int, int, int] | None, shape: tuple[int, int], m: int,
                        device: torch.device, what: str) -> tuple[int, int, int]:
    """``config`` (default: the device's) checked against what this call can run: the split limit of the
    loaded code and shared memory for x's slice."""
    out, inp = shape
    cfg = check_config(config if config is not None else device_default_config(out, inp, m, device))
    if cfg[2] > max_splits(device):
        raise ValueError(f"{what} config {cfg}: this build's code on {device} runs at most {max_splits(device)} "
                         f"split(s) (thread-block clusters need sm_90 code)")
    if not config_fits(m, inp, cfg, device):
        raise ValueError(f"{what} config {cfg} needs {smem_bytes(m, inp, cfg)} bytes of shared memory for "
                         f"in_features={inp}, M={m} (limit {smem_limit(device)}): use more splits")
    return cfg


def mmasp_linear(x: torch.Tensor, layout: MmaspLayout, bias: torch.Tensor | None = None,
                 config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` through the mma.sp kernel; x ``[..., in]`` with at most 16 rows in all."""
    out, inp, _, _ = _check_layout(layout)
    if x.shape[-1] == inp and x.dtype != layout.dtype:
        raise ValueError(f"x dtype {x.dtype} differs from the weight's {layout.dtype}")
    lead, x2 = check_call(x, (out, inp), "the mma.sp decode kernel")
    cfg = resolve_call_config(config, (out, inp), x2.shape[0], x.device, "mma.sp")
    if bias is not None and (bias.dtype != x.dtype or bias.shape != (out,) or bias.device != x.device):
        raise ValueError(f"bias must be a {x.dtype} vector of {out} on {x.device}, got {bias.dtype} "
                         f"{tuple(bias.shape)} on {bias.device}")
    if layout.a_frag.device != x.device:
        raise ValueError(f"x ({x.device}) and the weight ({layout.a_frag.device}) must be on one CUDA device")
    y = torch.ops.llmprune_kernels.sparse24_mmasp_linear(x2.contiguous(), layout.a_frag, layout.e_frag, out, bias, *cfg)
    return y.reshape(*lead, out)


def probe(a_regs: torch.Tensor, b_regs: torch.Tensor, e: torch.Tensor, selector: int, bf16: bool) -> torch.Tensor:
    """One warp's single ``mma.sp`` with the given registers (diagnostics): a/b ``[32, 4]`` and e ``[32]``
    int32 bit patterns per lane; returns d ``[32, 4]`` fp32 per lane."""
    return torch.ops.llmprune_kernels.sparse24_mmasp_probe(a_regs, b_regs, e, int(selector), bool(bf16))


_CUDA_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def op_runner(op, weight: tuple, m: int, k: int, n: int, bias: torch.Tensor | None, cfg: tuple) -> Callable:
    """``run(x)`` calling the mma.sp op ``op(x [m, k], *weight, n, bias, *cfg)``, output ``[..., n]``."""

    def run(x: torch.Tensor) -> torch.Tensor:
        # straight to the CUDA kernel: the caller adds the frozen-weight gradient (the op's Python autograd
        # kernel would cost ~10 us of host time a call, which eager decoding pays on every Linear)
        if torch._C._len_torch_dispatch_stack() == 0:
            y = op.redispatch(_CUDA_KEYS, x.reshape(m, k), *weight, n, bias, *cfg)
        else:  # a dispatch mode is watching: let it see the op
            y = op(x.reshape(m, k), *weight, n, bias, *cfg)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], n)
    return run
# launch configs (warps, rows_per_warp, splits) tuning measures besides the shape's default: those that won
# somewhere in an H100 measurement of every config
TUNE_CONFIGS = ((4, 1, 2), (4, 1, 4), (8, 1, 2), (8, 1, 4), (8, 2, 4))


class MmaspBackend(Backend):
    """Our CUDA kernel on the sparse tensor cores for M <= 16, reading the fragment-order layout."""

    name = "mmasp"
    max_m = MAX_M
    default_priority, default_max_m = 0, MAX_M
    traceable = False  # torch.compile of the op trips a data-dependent guard: compiled graphs run ``decode``

    def available(self, device: torch.device) -> bool:
        return device.type == "cuda" and available(device)

    def supports(self, out_features: int, in_features: int, dtype: torch.dtype) -> bool:
        return dtype in (torch.float16, torch.bfloat16) and in_features % 4 == 0

    def usable(self, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Also: this build's code on ``device`` can run every M up to 16 at this width (sm_80 code, one CTA per
        K range, does not fit wide inputs in shared memory)."""
        if not super().usable(out_features, in_features, dtype, device):
            return False
        if not (torch.cuda.is_available() and _ext.ext_with_cuda()):
            return True
        return config_fits(MAX_M, in_features, device_default_config(out_features, in_features, MAX_M, device),
                           device)

    def resolve(self, config, out_features, in_features, dtype, m, device, capturing):
        """A config this device cannot run (a tuning table measured with sm_90 code, loaded where the code is
        sm_80) gives way to the device's default."""
        if config is None or not config_fits(m, in_features, config, device):
            config = device_default_config(out_features, in_features, m, device)
        return config, True

    def prepare(self, packed: Packed24, config=None) -> MmaspLayout:
        return to_mmasp_layout(packed)

    def default_config(self, out_features, in_features, dtype, m):
        return device_default_config(out_features, in_features, m)

    def candidates(self, out_features, in_features, dtype, m):
        configs = dict.fromkeys((device_default_config(out_features, in_features, m),) + TUNE_CONFIGS)
        device = torch.cuda.current_device()
        return [c for c in configs if config_fits(m, in_features, c, device)]

    what = "mma.sp"  # names the kernel in errors

    def op(self):
        return torch.ops.llmprune_kernels.sparse24_mmasp_linear.default

    def weight(self, state) -> tuple:
        """The op's weight arguments from this backend's layout."""
        return state.a_frag, state.e_frag

    def bind(self, state, config, m, in_features, out_features, bias):
        cfg = resolve_call_config(check_config(config), (out_features, in_features), m, state.a_frag.device,
                                  self.what)
        return op_runner(self.op(), self.weight(state), m, in_features, out_features, bias, cfg)

    def call(self, state, config, x, out_features, bias):
        return mmasp_linear(x, state, bias, config)

    def config_from_json(self, value):
        return check_config(value)

