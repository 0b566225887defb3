"""The 8-bit 2:4 decode backend ``mmasp8``: our mma.sp kernel (``csrc/sparse24/mmasp_kernel.cuh``, op in
``sparse24_mmasp8.cu``) on FP8 e4m3 / INT8 kept values, for M <= 16 and per-channel scales.

The kernel is the 16-bit one of :mod:`.mmasp` (weight = sparse A operand, x^T = B, fp32 accumulation) with
its A registers loaded as 8-bit values and widened in registers to the activations' fp16 / bf16 (exact: every
e4m3 and int8 value is one), so a decode step reads 2.5 bytes per 4 weights instead of 4.5. The row's scale
multiplies the fp32 accumulator once, before the split-K partials are summed.

Layout (built once from :class:`~llmprune_kernels.sparse24.quant8.Packed24Q8`, any device):

* ``a_frag [ceil(out/16), Kp/64, 32, 16]`` (the values' dtype): the 16-bit layout's per-lane order
  (:func:`.mmasp.frag_values`) with k-steps ``2j`` and ``2j + 1`` side by side, so a lane loads 16 bytes every
  two k-steps (bytes 0-7: k-step 2j's four A registers, low byte first; bytes 8-15: k-step 2j + 1);
* ``e_frag``: the 16-bit layout's metadata words (:func:`.mmasp.frag_meta`); ``scale [out]`` fp32.

FP8 values need sm_89 code (``cvt.rn.f16x2.e4m3x2``); INT8 runs on any build with mma.sp (sm_80).
:func:`widened_a_frag` mirrors the kernel's widening on the CPU (the 16-bit fragments the registers hold).
Reference: :func:`llmprune_kernels.reference.sparse24_8bit.sparse24_8bit_linear_reference`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmprune_kernels import _ext
from llmprune_kernels.sparse24.backends import mmasp
from llmprune_kernels.sparse24.backends.mmasp import (CHUNK, MAX_M, MmaspBackend, MmaspLayout, check_call,
                                                      check_shape, frag_meta, frag_values, from_mmasp_layout,
                                                      padded_dims, resolve_call_config)
from llmprune_kernels.sparse24.quant8 import QMAX, Packed24Q8

OP = "llmprune_kernels::sparse24_mmasp8_linear"


@dataclass
class Mmasp8Layout:
    """An 8-bit 2:4 weight in the kernel's fragment order (see the module docstring)."""

    a_frag: torch.Tensor  # [ceil(out/16), Kp/64, 32, 16], float8_e4m3fn or int8
    e_frag: torch.Tensor  # [ceil(out/16), Kp/256, 32, 4], int32
    scale: torch.Tensor  # [out], float32
    shape: tuple[int, int]

    def nbytes(self) -> int:
        return self.a_frag.numel() + self.e_frag.numel() * 4 + self.scale.numel() * 4


def _bytes(values: torch.Tensor) -> torch.Tensor:
    return values.view(torch.uint8)


@torch.no_grad()
def to_mmasp8_layout(q: Packed24Q8) -> Mmasp8Layout:
    """Fragment order of a per-channel 8-bit 2:4 weight; per-group scales raise (the kernel applies one scale
    per output row)."""
    if not isinstance(q, Packed24Q8):
        raise ValueError(f"backend 'mmasp8' runs 8-bit 2:4 weights (Packed24Q8), got {type(q).__name__}")
    if q.group_size is not None:
        raise ValueError(f"backend 'mmasp8' takes per-channel scales; this weight has group_size={q.group_size} "
                         f"(allowed: None; per-group weights run on backend 'decode8')")
    out, inp = q.shape
    check_shape(q.shape)
    a = frag_values(_bytes(q.values), q.shape)  # [rb, ks, 32, 8] bytes
    rb, ks = a.shape[:2]
    a = a.reshape(rb, ks // 2, 2, 32, 8).permute(0, 1, 3, 2, 4).reshape(rb, ks // 2, 32, 16)
    return Mmasp8Layout(a.contiguous().view(q.values.dtype), frag_meta(q.meta, q.shape),
                        q.scale.float().reshape(out).contiguous(), (out, inp))


def _unpaired(layout: Mmasp8Layout) -> torch.Tensor:
    """``a_frag`` back in the 16-bit layout's shape ``[rb, ks, 32, 8]`` (bytes)."""
    out, inp = layout.shape
    rb, nc = padded_dims(out, inp)
    a = _bytes(layout.a_frag)
    if tuple(a.shape) != (rb, nc * 4, 32, 16):
        raise ValueError(f"a_frag has shape {tuple(a.shape)}; expected {(rb, nc * 4, 32, 16)} for {(out, inp)}")
    return a.reshape(rb, nc * 4, 32, 2, 8).permute(0, 1, 3, 2, 4).reshape(rb, nc * CHUNK // 32, 32, 8)


@torch.no_grad()
def from_mmasp8_layout(layout: Mmasp8Layout) -> Packed24Q8:
    """Exact inverse of :func:`to_mmasp8_layout`."""
    dtype = layout.a_frag.dtype
    packed = from_mmasp_layout(MmaspLayout(_unpaired(layout).contiguous(), layout.e_frag, layout.shape))
    return Packed24Q8(packed.values.view(dtype), packed.meta, layout.scale.reshape(-1, 1).clone(), layout.shape, None)


def widened_a_frag(layout: Mmasp8Layout, dtype: torch.dtype) -> torch.Tensor:
    """The 16-bit A fragments ``[rb, ks, 32, 8]`` the kernel's registers hold after widening (unscaled values in
    ``dtype``): k-step ``kk``'s registers come from bytes ``8 * (kk & 1)`` on of load ``kk >> 1``."""
    return _unpaired(layout).view(layout.a_frag.dtype).to(dtype)


def op_available() -> bool:
    """The CUDA build of ``_C`` holds the 8-bit op."""
    return _ext.ext_with_cuda() and torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CUDA")


def _fp8_code(device: torch.device) -> bool:
    return _ext.ext_cuda_code_arch(mmasp._index(device)) >= 890


def mmasp8_linear(x: torch.Tensor, layout: Mmasp8Layout, bias: torch.Tensor | None = None,
                  config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` through the 8-bit mma.sp kernel; x ``[..., in]`` fp16 / bf16 with 1..16 rows in all."""
    out, inp = layout.shape
    if x.shape[-1] == inp and x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x dtype {x.dtype} is not supported by the 8-bit mma.sp kernel; allowed: torch.float16, "
                         f"torch.bfloat16")
    what = "the 8-bit mma.sp kernel"
    lead, x2 = check_call(x, layout.shape, what, op_available())
    if layout.a_frag.dtype == torch.float8_e4m3fn and not _fp8_code(x.device):
        raise ValueError("FP8 e4m3 values need sm_89 code; this build's code on this GPU is older: use int8 values")
    cfg = resolve_call_config(config, layout.shape, x2.shape[0], x.device, what)
    y = torch.ops.llmprune_kernels.sparse24_mmasp8_linear(x2.contiguous(), layout.a_frag, layout.e_frag,
                                                          layout.scale, out, bias, *cfg)
    return y.reshape(*lead, out)


class Mmasp8Backend(MmaspBackend):
    """The mma.sp kernel on the 8-bit packing (8-bit modules only, M <= 16, per-channel scales)."""

    name = "mmasp8"
    quantized = True  # prepares from Packed24Q8
    default_priority, default_max_m = None, MAX_M

    def available(self, device: torch.device) -> bool:
        return super().available(device) and op_available()

    def supports(self, out_features: int, in_features: int, dtype: torch.dtype) -> bool:
        """``dtype``: the weight values' dtype; only 8-bit weights (16-bit modules never dispatch here)."""
        return dtype in QMAX and in_features % 4 == 0

    def usable(self, out_features, in_features, dtype, device) -> bool:
        """As mma.sp's, and FP8 values only with sm_89 code."""
        return super().usable(out_features, in_features, dtype, device) and (
            dtype != torch.float8_e4m3fn or _fp8_code(device))

    def accepts(self, x_dtype: torch.dtype, group_size: int | None = None) -> bool:
        return x_dtype in (torch.float16, torch.bfloat16) and group_size is None

    def prepare(self, packed, config=None) -> Mmasp8Layout:
        return to_mmasp8_layout(packed)

    what = "8-bit mma.sp"

    def op(self):
        return torch.ops.llmprune_kernels.sparse24_mmasp8_linear.default

    def weight(self, state: Mmasp8Layout) -> tuple:
        return state.a_frag, state.e_frag, state.scale

    def call(self, state, config, x, out_features, bias):
        return mmasp8_linear(x, state, bias, config)
