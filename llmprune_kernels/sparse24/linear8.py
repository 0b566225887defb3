"""``SparseLinear8``: a drop-in ``nn.Linear`` holding an 8-bit 2:4 weight (FP8 e4m3 or INT8 values, 2:4 metadata,
scales: :mod:`llmprune_kernels.sparse24.quant8`). ``sparsify_(model, SemiSparseWeightConfig(weight_dtype=...))``
swaps them in; only an explicit ``weight_dtype`` makes 8-bit modules.

Forward is ``F.linear(x, W, bias)`` with ``W`` the dequantised masked weight, computed in the module's
``compute_dtype`` (the Linear's dtype: fp16 / bf16 / fp32; x must have it, as for ``nn.Linear``):

* CUDA, M <= 16: an 8-bit decode kernel, which reads the 8-bit weight itself: the one tuning measured fastest
  for this shape (``decode8``, Triton; ``mmasp8``, the mma.sp kernel, per-channel scales; see
  :func:`~llmprune_kernels.sparse24.tuning8.tune_q8`), else ``decode8``;
* CUDA, larger M, ``activations = "8bit"`` (opt-in; per-channel scales, fp16 / bf16): cuSPARSELt's 8-bit x 8-bit
  2:4 GEMM with the activations quantised per token to the weight's 8-bit type (backend ``cslt8``), in the
  buckets where tuning (:mod:`~llmprune_kernels.sparse24.tuning8`) measured it faster than the fallback below;
* CUDA, larger M otherwise: the 16-bit 2:4 dispatch of :class:`SparseLinear` (tuning table, cuSPARSELt, dense,
  ...) on the weight dequantised to ``compute_dtype``; the chosen path's layout is built once and kept (memory: a
  16-bit 2:4 layout is 1.8x the 8-bit one, a dense copy 6.4x; ``dense_tolerance`` avoids dense copies);
* CPU: the reference, the dequantised dense weight in ``F.linear`` (rebuilt per call: no 16-bit copy kept).

Under ``torch.compile`` the 8-bit decode path is ``decode8``'s op (``llmprune_kernels::sparse24_mm8``, with a fake
and the frozen-weight gradient), so compiled models read the 8-bit weight too.

``.half()`` / ``.to(dtype)`` change ``compute_dtype`` (and the bias) but never the 8-bit values or the
scales; device moves move all of them. Gradients for x and bias (the weight is frozen) use the dequantised
weight.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from llmprune_kernels.sparse24 import backends, dispatch
from llmprune_kernels.sparse24.autograd import grad_can_flow, linear_grads
from llmprune_kernels.sparse24.backends.cslt8 import alpha_vector_ok
from llmprune_kernels.sparse24.linear import SparseLinear
from llmprune_kernels.sparse24.pack import Packed24
from llmprune_kernels.sparse24.quant8 import (Packed24Q8, check_activations, check_fp8_device, check_group_size,
                                              dequantize_24, n_groups, quantize_24, scale_dtype_of, weight_dtype_name,
                                              weight_dtype_of)

_Q8_BUFFERS = ("values", "scale")  # kept in their dtypes by module casts
DECODE8, CSLT8 = "decode8", "cslt8"


class SparseLinear8(SparseLinear):
    """``y = x @ W.T + b`` with a 2:4 ``W`` stored as 8-bit values plus scales (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 weight_dtype="fp8", group_size: int | None = None, scale_dtype="float32"):
        qdtype, sdtype = weight_dtype_of(weight_dtype), scale_dtype_of(scale_dtype)
        group_size = check_group_size(group_size)
        dtype = dtype or torch.get_default_dtype()
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"SparseLinear8 compute dtype {dtype} is not supported; allowed: torch.float16, "
                             f"torch.bfloat16, torch.float32")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.compute_dtype = dtype
        self.group_size = group_size
        self.activations = "16bit"  # "8bit": the opt-in 8-bit-activation path (backend cslt8) where it measured faster
        self.values = torch.zeros(out_features, in_features // 2, device=device, dtype=qdtype)
        self.register_buffer("scale", torch.ones(out_features, n_groups(in_features, group_size), device=device,
                                                 dtype=sdtype))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, q: Packed24Q8, bias: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.float16) -> "SparseLinear8":
        q.check()
        out_features, in_features = q.shape
        mod = cls(in_features, out_features, bias is not None, device=q.device, dtype=dtype,
                  weight_dtype=q.values.dtype, group_size=q.group_size, scale_dtype=q.scale.dtype)
        for name in ("values", "meta", "scale"):
            getattr(mod, name).copy_(getattr(q, name))
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Module, weight_dtype="fp8", group_size: int | None = None,
                    scale_dtype="float32") -> "SparseLinear8":
        """Quantise ``linear``'s 2:4 weight (an ``nn.Linear`` or a 16-bit :class:`SparseLinear`); the module
        computes in the weight's dtype. A weight that is not 2:4 raises naming the first bad row and group."""
        w = linear.weight.detach()
        check_fp8_device(weight_dtype_of(weight_dtype), w.device)
        q = quantize_24(w, weight_dtype, group_size, scale_dtype)
        return cls.from_quantized(q, linear.bias, dtype=w.dtype)

    def quantized(self) -> Packed24Q8:
        return Packed24Q8(self.values, self.meta, self.scale, (self.out_features, self.in_features), self.group_size)

    def packed(self) -> Packed24:
        """The 16-bit 2:4 packing of the dequantised weight (in ``compute_dtype``): what every 16-bit path runs."""
        return dequantize_24(self.quantized(), self.compute_dtype)

    @property
    def weight_dtype(self) -> str:
        return weight_dtype_name(self.values.dtype)

    def extra_repr(self) -> str:
        group = "per channel" if self.group_size is None else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"2:4 {self.weight_dtype}, {group}, compute_dtype={self.compute_dtype}")

    # -- state ----------------------------------------------------------------------------------
    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "activations":
            check_activations(value)
        if name in ("scale", "group_size", "compute_dtype", "activations") and "_runners" in self.__dict__:
            self._runners.clear()
            self._cache.clear()

    def _apply(self, fn, recurse=True):
        """Casts change ``compute_dtype`` and the bias; the 8-bit values and scales only change device."""
        q8 = {k: self._buffers[k] for k in _Q8_BUFFERS}
        order = list(self._buffers)
        probe = fn(torch.zeros((), dtype=self.compute_dtype, device=self.values.device))
        for k in _Q8_BUFFERS:
            del self._buffers[k]
        try:
            super()._apply(fn, recurse)
        finally:
            rest = dict(self._buffers)
            self._buffers.clear()
            for k in order:
                self._buffers[k] = q8[k].to(probe.device) if k in q8 else rest[k]
        if probe.is_floating_point() and probe.dtype in (torch.float16, torch.bfloat16, torch.float32):
            self.compute_dtype = probe.dtype
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        bad = False
        for k in _Q8_BUFFERS:  # copy_ would convert silently: an int8 checkpoint into fp8 values, fp16 scales ...
            t = state_dict.get(prefix + k)
            if t is not None and t.dtype != getattr(self, k).dtype:
                bad = True
                error_msgs.append(f"{prefix + k} is {t.dtype}; this SparseLinear8 holds {getattr(self, k).dtype} "
                                  f"(allowed: the same dtype)")
        if bad:
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # -- dispatch -------------------------------------------------------------------------------
    def _shape(self) -> tuple[int, int, torch.dtype]:
        return self.out_features, self.in_features, self.compute_dtype  # the 16-bit fallback's table key

    def q8_key(self) -> str:
        """The tuning-table key of this module's 8-bit decode choice (M <= 16)."""
        return dispatch.q8_key(self.out_features, self.in_features, self.compute_dtype, self.values.dtype)

    def _runs(self, path: str, m: int) -> bool:
        """Whether 8-bit backend ``path`` can take an M-row call of this module (its values' dtype and device, its
        compute dtype and scales)."""
        b = backends.get(path)
        return (b.serves(m) and b.usable(self.out_features, self.in_features, self.values.dtype, self.values.device)
                and b.accepts(self.compute_dtype, self.group_size))

    def _q8_choice(self, m: int) -> dispatch.Choice | None:
        """The measured 8-bit decode backend for M rows, where it can take this module's call (inside
        torch.compile only a backend with a traceable op: the others' checks are not even asked there)."""
        c = self._table().lookup_key(self.q8_key(), m)
        if c is None or (torch.compiler.is_compiling() and not backends.get(c.path).traceable):
            return None
        return c if self._runs(c.path, m) else None

    def act8_key(self) -> str | None:
        """The tuning-table key of the 8-bit-activation choice, None where this module cannot take that path
        (not opted in, per-group scales, a compute dtype other than fp16 / bf16)."""
        if self.activations != "8bit" or self.group_size is not None or self.compute_dtype not in (
                torch.float16, torch.bfloat16):
            return None
        return dispatch.act8_key(self.out_features, self.in_features, self.compute_dtype, self.values.dtype)

    def _act8_choice(self, m: int) -> dispatch.Choice | None:
        key = self.act8_key()
        c = None if key is None else self._table().lookup_key(key, m)
        return c if c is not None and c.path == CSLT8 and self._runs(CSLT8, m) else None

    def choose(self, m: int) -> dispatch.Choice:
        """A pinned backend where it can take this call (else dense); on CUDA the measured 8-bit decode kernel
        (else ``decode8``, and ``decode8`` inside torch.compile where the choice has no traceable op) for
        M <= 16; with 8-bit activations opted in, cslt8 in the buckets where it measured
        faster; else the 16-bit 2:4 dispatch for (out, in, compute_dtype) on the dequantised weight."""
        if self.force_path is None and self.values.device.type == "cuda":
            c = self._q8_choice(m)
            if c is not None:
                return c
            if self._runs(DECODE8, m):  # also where compiled graphs cannot trace the measured choice
                return dispatch.pinned(DECODE8)
            c = self._act8_choice(m)
            if c is not None:
                return c
        return super().choose(m)

    def _eager(self, choice: dispatch.Choice, m: int) -> dispatch.Choice:
        """8-bit backends give way to their eager substitute (``decode8`` to ``mmasp8``, a C++ op with far less
        launch cost) where it was measured, checked on the 8-bit values' dtype and this module's scales."""
        if not backends.get(choice.path).quantized:
            return super()._eager(choice, m)
        c = dispatch.eager_choice(choice, m, self.out_features, self.in_features, self.values.dtype, self.values.device)
        return c if backends.get(c.path).accepts(self.compute_dtype, self.group_size) else choice

    def _layout_source(self, backend) -> Any:
        """8-bit backends build from the 8-bit weight (cslt8 compresses it; decode8 reads it as it is), the
        16-bit ones from the dequantised packing."""
        return self.quantized() if backend.quantized else super()._layout_source(backend)

    def layout(self, path: str, config: Any = None) -> Any:
        if path == "dense" and self.values.device.type != "cuda":  # the CPU reference keeps no 16-bit copy
            return backends.get(path).prepare(self.packed(), config)
        return super().layout(path, config)

    @torch.no_grad()
    def prepare(self, paths: set[str] | None = None) -> "SparseLinear8":
        """Build the layouts the dispatch will need: the 8-bit decode kernels' (``decode8`` reads the weight
        itself; ``mmasp8``, where tuning chose it, keeps its fragment order), the 16-bit paths the table (or the
        defaults) run above M = 16, and cslt8's compressed weight where the opted-in
        8-bit-activation choice takes it in some bucket."""
        self._runners.clear()
        dev = self.values.device
        if dev.type != "cuda":
            return self
        table = self._table()
        table.install(*self._shape())
        if paths is None:
            top = backends.get(DECODE8).max_m
            paths = {dispatch.lean_choice(c, self.dense_tolerance).path
                     for b, c in table.choices(*self._shape()).items() if b > top}
            paths |= {dispatch.default_choice(*self._shape(), 4096, dev).path}
            if self.force_path:
                paths |= {self.force_path, "dense"}
            paths |= {c.path for c in table.entries.get(self.q8_key(), {}).values()}
        key = self.act8_key()
        if key is not None and any(c.path == CSLT8 for c in table.entries.get(key, {}).values()):
            paths = set(paths) | {CSLT8}
        for path in paths:
            b = backends.get(path)
            if b.accepts(self.compute_dtype, self.group_size) if b.quantized else b.usable(*self._shape(), dev):
                for cfg in table.configs_for(path, *self._shape()):
                    self.layout(path, cfg)
        if CSLT8 in paths:  # the alpha-vector check runs now, not inside a CUDA-graph capture
            alpha_vector_ok(self.values.dtype, self.compute_dtype, dev)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.compute_dtype:
            raise TypeError(f"SparseLinear8 computes in {self.compute_dtype}; x is {x.dtype} (allowed: the module's "
                            f"dtype, as for nn.Linear: cast x or the module)")
        if grad_can_flow(x, self.bias) and not torch.compiler.is_compiling():
            return _Frozen8Linear.apply(x, self.bias, self)
        return super().forward(x)


class _Frozen8Linear(torch.autograd.Function):
    """Any backend's forward, with the frozen-weight gradients of the dequantised weight."""

    @staticmethod
    def forward(ctx, x, bias, module):
        ctx.module = module
        with torch.no_grad():
            return SparseLinear.forward(module, x)

    @staticmethod
    def backward(ctx, gy):
        gx, gb = linear_grads(gy, lambda: ctx.module.weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gx, gb, None

