"""8-bit 2:4 weights: the kept values of the 2:4 packing as FP8 e4m3 or INT8, with scales.

Layout (:class:`Packed24Q8`; the Triton decode kernel ``backends.decode8`` and the compressed checkpoint read
it directly):

* ``values [out, in/2]``: the 2:4 packing's kept values (:mod:`llmprune_kernels.sparse24.pack`, same order)
  divided by their scale and rounded to ``torch.float8_e4m3fn`` (round to nearest even, |q| <= 448) or
  ``torch.int8`` (round half to even, |q| <= 127: symmetric, so -128 is never used);
* ``meta [out, ceil(in/8)]``: the 2:4 metadata, exactly the 16-bit packing's;
* ``scale [out, groups]`` (float32 or float16): per output channel (``group_size=None``, one column) or per
  group of ``group_size`` input columns (a multiple of 4, so a 2:4 group never straddles two scales; the
  last group may be shorter). A scale is the group's largest |w| over the 8-bit format's largest value,
  rounded up when stored as float16, so no value is clipped; an all-zero group gets scale 1.

``W[r, k] = q[r, k] * scale[r, k // group_size]`` wherever the packing keeps ``k``. A 2:4 FP8/INT8 weight
moves 2.5 bytes per 4 weights (2 values + one 4-bit nibble), 0.3125 of dense fp16's 8 (a 3.2x limit).
Error per kept weight (per-channel or per-group ``s``): INT8 ``<= s / 2``; FP8 e4m3 ``<= max(|w| / 16,
s / 1024)`` (3 mantissa bits; the second term is the subnormal range).
FP8 runs on GPUs with FP8 conversions (compute capability 8.9 and newer) and on the CPU; INT8 everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmprune_kernels.sparse24.pack import Packed24, meta_width, pack_24

WEIGHT_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def weight_dtype_of(name) -> torch.dtype:
    """``"fp8"`` / ``"int8"`` (or the torch dtype itself) -> the values' torch dtype."""
    if isinstance(name, torch.dtype) and name in QMAX:
        return name
    if isinstance(name, str) and name in WEIGHT_DTYPES:
        return WEIGHT_DTYPES[name]
    raise ValueError(f"8-bit 2:4 weight dtype {name!r} is not supported; allowed: "
                     f"{', '.join(repr(k) for k in WEIGHT_DTYPES)} (torch.float8_e4m3fn, torch.int8)")


def weight_dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in WEIGHT_DTYPES.items() if v == dtype)


def scale_dtype_of(name) -> torch.dtype:
    if isinstance(name, torch.dtype) and name in SCALE_DTYPES.values():
        return name
    if isinstance(name, str) and name in SCALE_DTYPES:
        return SCALE_DTYPES[name]
    raise ValueError(f"scale dtype {name!r} is not supported; allowed: {', '.join(repr(k) for k in SCALE_DTYPES)}")


def check_group_size(group_size, in_features: int | None = None) -> int | None:
    """None (per output channel) or a positive multiple of 4 (the 2:4 group)."""
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 4:
        raise ValueError(f"group_size {group_size!r} is not supported; allowed: None (one scale per output channel) "
                         f"or a positive multiple of 4 (the 2:4 group), e.g. 64 or 128")
    return group_size


def n_groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(in_features / group_size)


def fp8_ok(device: torch.device | str) -> bool:
    """Whether ``device`` runs FP8 e4m3 conversions (CPU: yes; CUDA: compute capability 8.9 or newer)."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    props = torch.cuda.get_device_properties(device)  # torch.compile folds this call (not get_device_capability)
    return (props.major, props.minor) >= (8, 9)


ACTIVATIONS = ("16bit", "8bit")


def check_activations(value) -> str:
    if value not in ACTIVATIONS:
        raise ValueError(f"activations {value!r} is not supported; allowed: '16bit' (the module's dtype) or '8bit' "
                         f"(quantised per token to the weight's 8-bit type for M > 16 where measured faster; "
                         f"per-channel weight scales)")
    return value


def check_fp8_device(dtype: torch.dtype, device: torch.device | str) -> None:
    if dtype == torch.float8_e4m3fn and not fp8_ok(device):
        cap = torch.cuda.get_device_capability(torch.device(device))
        raise ValueError(f"weight dtype 'fp8' needs a GPU with FP8 (compute capability 8.9 or newer); "
                         f"{torch.device(device)} has {cap[0]}.{cap[1]}: use 'int8'")


@dataclass
class Packed24Q8:
    """A 2:4 weight with 8-bit values and scales (see the module docstring)."""

    values: torch.Tensor  # [out, in/2], float8_e4m3fn or int8
    meta: torch.Tensor  # [out, ceil(in/8)], uint8, the 16-bit packing's metadata
    scale: torch.Tensor  # [out, groups], float32 or float16
    shape: tuple[int, int]  # dense (out, in)
    group_size: int | None = None  # None: one scale per output channel

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device) -> "Packed24Q8":
        """Move to ``device``; every dtype is kept."""
        return Packed24Q8(self.values.to(device), self.meta.to(device), self.scale.to(device), self.shape,
                          self.group_size)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.meta, self.scale))

    def check(self) -> None:
        """Raise naming the first field whose shape or dtype does not fit ``shape`` and ``group_size``."""
        out, inp = self.shape
        check_group_size(self.group_size)
        want = {"values": ((out, inp // 2), tuple(QMAX)), "meta": ((out, meta_width(inp)), (torch.uint8,)),
                "scale": ((out, n_groups(inp, self.group_size)), tuple(SCALE_DTYPES.values()))}
        for name, (shape, dtypes) in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype not in dtypes:
                raise ValueError(f"8-bit 2:4 {name} is {list(t.shape)} {t.dtype}; expected {list(shape)} "
                                 f"{' or '.join(str(d) for d in dtypes)} for {(out, inp)}, group_size={self.group_size}")


def value_groups(in_features: int, group_size: int | None, device=None) -> torch.Tensor:
    """The scale column of each packed value ``[in/2]`` (int64): packed column c lies in 2:4 group c // 2."""
    c = torch.arange(in_features // 2, device=device)
    return torch.zeros_like(c) if group_size is None else (c // 2 * 4) // group_size


def _next_up(t: torch.Tensor) -> torch.Tensor:
    """The next larger float of each positive finite ``t`` (its bit pattern + 1; any device and float width)."""
    itype = {2: torch.int16, 4: torch.int32}[t.element_size()]
    return (t.view(itype) + 1).view(t.dtype)


def _round_up_fp16(s: torch.Tensor) -> torch.Tensor:
    """``s`` (fp32, > 0) as float16, never below ``s`` (so no quantised value exceeds the format's range)."""
    if bool((s >= torch.finfo(torch.float16).max).any()):
        raise ValueError(f"a weight scale of {float(s.max()):.4g} overflows float16; use scale_dtype='float32'")
    h = s.to(torch.float16)
    return torch.where(h.float() < s, _next_up(h), h)


@torch.no_grad()
def quantize_24(weight: torch.Tensor, weight_dtype="fp8", group_size: int | None = None,
                scale_dtype="float32") -> Packed24Q8:
    """Pack a 2:4-sparse weight ``[out, in]`` (any float dtype) and store its kept values in 8 bits.

    ``weight_dtype``: ``"fp8"`` (e4m3) or ``"int8"``; ``group_size``: None (one scale per output channel) or a
    multiple of 4; ``scale_dtype``: ``"float32"`` or ``"float16"``. A weight that is not 2:4 raises naming the
    row and group (as ``pack_24``)."""
    qdtype, sdtype = weight_dtype_of(weight_dtype), scale_dtype_of(scale_dtype)
    packed = pack_24(weight)
    out, inp = packed.shape
    group_size = check_group_size(group_size)
    v = packed.values.float()
    if not bool(torch.isfinite(v).all()):
        r, c = (int(i) for i in (~torch.isfinite(v)).nonzero()[0])
        raise ValueError(f"weight holds a non-finite kept value {float(v[r, c])} (row {r}); allowed: finite weights")
    idx = value_groups(inp, group_size, v.device)
    ng = n_groups(inp, group_size)
    amax = torch.zeros(out, ng, device=v.device).scatter_reduce_(1, idx.expand(out, -1), v.abs(), "amax")
    s = amax / QMAX[qdtype]
    s = torch.where(s > 0, s, torch.ones_like(s))
    s = torch.where(s * QMAX[qdtype] < amax, _next_up(s), s)  # rounded up where the division rounded down
    s = _round_up_fp16(s) if sdtype == torch.float16 else s
    q = v / s.float()[:, idx]  # with the stored scale, so dequantising gives the nearest 8-bit value
    if qdtype == torch.int8:
        q = q.round().clamp_(-127, 127).to(torch.int8)
    else:
        q = q.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
    return Packed24Q8(q.contiguous(), packed.meta, s.contiguous(), (out, inp), group_size)


def dequantize_values(q: Packed24Q8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The packed values ``[out, in/2]`` times their scales, in ``dtype`` (the product is formed in fp32)."""
    idx = value_groups(q.shape[1], q.group_size, q.values.device)
    return (q.values.float() * q.scale.float()[:, idx]).to(dtype)


def dequantize_24(q: Packed24Q8, dtype: torch.dtype = torch.float32) -> Packed24:
    """The 16/32-bit 2:4 packing of the dequantised weight (same metadata), for every 16-bit 2:4 path."""
    return Packed24(dequantize_values(q, dtype), q.meta, q.shape)


# Per-token activation scales (8-bit activations, backend ``cslt8``). The 8-bit matmul's output is formed in the
# compute dtype before the token's scale is applied; dividing it by OUT_SHIFT (a power of two >= the 8-bit
# range) keeps that intermediate below the row's L1 norm (no fp16 overflow), exactly.
OUT_SHIFT = {torch.float8_e4m3fn: 512.0, torch.int8: 128.0}


def activation_scales(amax: torch.Tensor, qdtype: torch.dtype, scale_dtype: torch.dtype) -> torch.Tensor:
    """Per-token scales from each token's largest |x| (``amax``, any float dtype, shape [M]): ``amax / QMAX``
    rounded up to ``scale_dtype`` (so no value is clipped), 1 for an all-zero token, at least the dtype's
    smallest normal, and at most ``finfo(scale_dtype).max / OUT_SHIFT`` (so ``scale * OUT_SHIFT`` is finite; only
    fp16 tokens with |x| above ~57000 (FP8) / ~65000 (INT8) are clipped by this)."""
    a = amax.float()
    s = a / QMAX[qdtype]
    s = torch.where(s * QMAX[qdtype] < a, _next_up(s), s)
    s = torch.where(a > 0, s, torch.ones_like(s))
    fi = torch.finfo(scale_dtype)
    s = s.clamp(min=fi.tiny, max=fi.max / OUT_SHIFT[qdtype])
    if scale_dtype != torch.float32:
        h = s.to(scale_dtype)
        s = torch.where(h.float() < s, _next_up(h), h).float().clamp(max=fi.max / OUT_SHIFT[qdtype])
    return s.to(scale_dtype)
