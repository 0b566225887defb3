"""``SparseLinear``: a drop-in ``nn.Linear`` holding a packed 2:4 weight, and ``sparsify_`` to swap them in.

Forward is ``F.linear(x, W, bias)`` with ``W`` the masked dense weight, whatever path runs it:

* CPU: the masked dense matmul (the reference), so CI checks the semantics;
* CUDA: per M bucket, the path measured fastest for this weight shape at ``sparsify_`` time (or read
  from a saved tuning table): our mma.sp CUDA kernel or our Triton decode kernel (small M), our
  cached-plan cuSPARSELt op or CUTLASS's sm90 sparse GEMM (large M), or a dense copy of the masked
  weight where sparse would lose.

The packed ``values`` / ``meta`` buffers are the state (``state_dict``); the cuSPARSELt- and
CUTLASS-compressed copies, the mma.sp fragment-order copy and any dense copy are caches rebuilt by ``prepare()`` after a device or
dtype move. Call ``prepare()`` (``sparsify_`` does) before capturing a CUDA graph or ``torch.compile``.

Eager CUDA calls take a fast path: the first call with a given M resolves the dispatch (table lookup,
decode config, cached weights, launch arguments) into a small callable kept per M, so later calls only
launch. The per-M cache is dropped on device / dtype moves, ``load_state_dict``, ``prepare()``, when
``table`` / ``force_path`` / a weight attribute is reassigned, and when tuning results change.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmprune_kernels.sparse24.backends import decode as s24
from llmprune_kernels.sparse24.backends import mmasp as mmasp
from llmprune_kernels.sparse24.backends.decode import sparse24_mm
from llmprune_kernels.sparse24.backends import cusparselt as cslt
from llmprune_kernels.sparse24.backends import cutlass_sm90 as ctl
from llmprune_kernels.sparse24 import dispatch
from llmprune_kernels.sparse24.pack import Packed24, check_24, expand_24, meta_width, pack_24, unpack_24


_RUNNER_KEYS = frozenset({"values", "meta", "bias", "table", "force_path", "dense_tolerance"})  # reassigning one drops the runners
_MAX_RUNNERS = 64  # distinct M values kept (prefill lengths vary; decode repeats one M)
_CUDA_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def _grad_can_flow(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def _no_autograd_needed(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """No gradient can flow through this call and no dispatch mode is watching: an op whose autograd
    formula is registered from Python may then go straight to its CUDA kernel (the Python autograd
    kernel costs ~10 us of host time a call, which eager decoding pays on every Linear)."""
    return not _grad_can_flow(x, bias) and torch._C._len_torch_dispatch_stack() == 0


class _LibraryOpGrad(torch.autograd.Function):
    """Gradients for the library-backed paths (cuSPARSELt, CUTLASS), whose ops have no autograd formula:
    forward runs the sparse op; backward gives dx = dy @ W (W expanded from the packed weight only then,
    so no dense copy is kept) and db = sum(dy). The packed weight is a buffer: it gets no gradient."""

    @staticmethod
    def forward(ctx, x, bias, fwd, values, meta, in_features):
        ctx.save_for_backward(values, meta)
        ctx.in_features = in_features
        with torch.no_grad():
            return fwd(x)

    @staticmethod
    def backward(ctx, gy):
        values, meta = ctx.saved_tensors
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = gy @ expand_24(values, meta, ctx.in_features).to(gy.dtype)
        if ctx.needs_input_grad[1]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, gb, None, None, None, None


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with a 2:4-sparse ``W`` stored packed (see :mod:`llmprune_kernels.sparse24.pack`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        # (M, capturing a CUDA graph) -> bound CUDA call: eager calls and graph captures may take other paths
        self._runners: dict[tuple[int, bool], Callable[[torch.Tensor], torch.Tensor]] = {}
        self._epoch = dispatch.EPOCH
        if in_features % 4 != 0:
            raise ValueError(f"SparseLinear needs in_features to be a multiple of 4 for 2:4, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, device=device, dtype=dtype))
        self.register_buffer("meta", torch.full((out_features, meta_width(in_features)), 0x44, device=device,
                                                dtype=torch.uint8))  # all groups keep columns (0, 1)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.table: dispatch.TuningTable | None = None  # None: the process-wide dispatch.DEFAULT_TABLE
        self._cache: dict[str, torch.Tensor] = {}
        self.force_path: str | None = None  # tests / benchmarks pin one path
        # memory-lean dispatch (dispatch.lean_choice): a sparse path within this fraction of dense's time runs
        # instead of dense, so no dense copy of the weight is kept for that bucket
        self.dense_tolerance: float = 0.0

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_packed(cls, packed: Packed24, bias: torch.Tensor | None = None) -> "SparseLinear":
        out_features, in_features = packed.shape
        mod = cls(in_features, out_features, bias is not None, device=packed.device, dtype=packed.dtype)
        mod.values.copy_(packed.values)
        mod.meta.copy_(packed.meta)
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SparseLinear":
        """Pack ``linear.weight`` (must be 2:4: an error names the first bad row and group)."""
        return cls.from_packed(pack_24(linear.weight.detach()), linear.bias)

    def packed(self) -> Packed24:
        return Packed24(self.values, self.meta, (self.out_features, self.in_features))

    @property
    def weight(self) -> torch.Tensor:
        """The masked dense weight (a fresh tensor; for inspection and compatibility, not for speed)."""
        return unpack_24(self.packed())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, 2:4"

    # -- caches ---------------------------------------------------------------------------------
    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in _RUNNER_KEYS and "_runners" in self.__dict__:
            self._runners.clear()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_runners"] = {}  # bound calls reference this instance's tensors: never copied or pickled
        return state

    def _apply(self, fn, recurse=True):
        self._cache.clear()  # caches belong to the old device / dtype
        self._runners.clear()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache.clear()
        self._runners.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _table(self) -> dispatch.TuningTable:
        return self.table if self.table is not None else dispatch.DEFAULT_TABLE

    def choose(self, m: int) -> dispatch.Choice:
        """The path for M input rows on this module's device."""
        dev = self.values.device
        if dev.type != "cuda":
            return dispatch.PINNED["dense"]
        if self.force_path is not None:  # mma.sp takes M <= 16: dense above
            too_many = self.force_path == "mmasp" and m > mmasp.MAX_M
            return dispatch.PINNED["dense" if too_many else self.force_path]
        c = self._table().lookup(self.out_features, self.in_features, self.values.dtype, m)
        if c is not None:
            return dispatch.lean_choice(c, self.dense_tolerance)
        return dispatch.default_choice(self.out_features, self.in_features, self.values.dtype, m, dev)

    def _dense(self) -> torch.Tensor:
        w = self._cache.get("dense")
        if w is None:
            if torch.compiler.is_compiling():  # traced: no data-dependent validation, no cache side effect
                return expand_24(self.values, self.meta, self.in_features)
            w = self._cache["dense"] = unpack_24(self.packed())
        return w

    def _compressed(self) -> torch.Tensor:
        c = self._cache.get("cslt")
        if c is None:
            c = self._cache["cslt"] = cslt.compress(unpack_24(self.packed()))
        return c

    def _cutlass(self, fmt: int = 0) -> ctl.CutlassWeight:
        """The CUTLASS weight in metadata format ``fmt`` (cache ``cutlass``, ``cutlass1``, ...)."""
        key = "cutlass" if fmt == 0 else f"cutlass{fmt}"
        c = self._cache.get(key)
        if c is None:
            c = self._cache[key] = ctl.share_values(ctl.compress(unpack_24(self.packed()), fmt), self.values)
        return c

    def _cutlass_for(self, choice: dispatch.Choice) -> tuple[int, ctl.CutlassWeight]:
        """A CUTLASS choice's config (0 when the table holds none) and the weight in the format it reads."""
        config = choice.cutlass if choice.cutlass is not None else 0
        return config, self._cutlass(ctl.format_of(config))

    def _mmasp_layout(self) -> mmasp.MmaspLayout:
        L = self._cache.get("mmasp")
        if L is None:
            L = self._cache["mmasp"] = mmasp.to_mmasp_layout(self.packed())
        return L

    @torch.no_grad()
    def prepare(self, paths: set[str] | None = None) -> "SparseLinear":
        """Build the caches the dispatch table will need (or ``paths``), so no call pays setup later."""
        self._runners.clear()
        if self.values.device.type != "cuda":
            self._dense()
            return self
        self._table().install_decode_configs(self.out_features, self.in_features, self.values.dtype)
        if paths is None:
            paths = self._table().paths_for(self.out_features, self.in_features, self.values.dtype,
                                            self.dense_tolerance)
            paths |= {dispatch.default_choice(self.out_features, self.in_features, self.values.dtype, m,
                                              self.values.device).path for m in (1, 4096)}
            if self.force_path:  # a pinned mma.sp path runs dense above its M limit
                paths |= {self.force_path, "dense"} if self.force_path == "mmasp" else {self.force_path}
        if "dense" in paths:
            self._dense()
        if "cusparselt" in paths and cslt.available() and cslt.shape_ok(self.out_features, self.in_features,
                                                                         self.values.dtype):
            self._compressed()
        if "mmasp" in paths and mmasp.supports(self.values.dtype, self.in_features):
            self._mmasp_layout()
        if "cutlass" in paths and ctl.available(self.values.device) and ctl.shape_ok(
                self.out_features, self.in_features, self.values.dtype):
            for fmt in self._table().cutlass_formats(self.out_features, self.in_features, self.values.dtype):
                self._cutlass(fmt)
        return self

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects {self.in_features} input features, got shape {tuple(x.shape)}")
        if x.is_cuda and not torch.compiler.is_compiling():
            if self._epoch != dispatch.EPOCH:  # tuning results changed since the runners were built
                self._runners.clear()
                self._epoch = dispatch.EPOCH
            key = (x.numel() // self.in_features, torch.cuda.is_current_stream_capturing())
            run = self._runners.get(key)
            if run is None:
                run = self._runner(*key)
            return run(x)
        return self._forward_general(x)

    def _runner(self, m: int, capturing: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """Resolve this M's dispatch into a bound call, for graph capture or for eager calls (where the
        Triton decode kernel gives way to the C++ mma.sp op when that was measured faster than dense:
        ``dispatch.eager_choice``)."""
        if self.values.device.type != "cuda":  # a CUDA input to a CPU module: let F.linear report it
            return self._forward_general
        choice = self.choose(m)
        n, k, bias = self.out_features, self.in_features, self.bias
        if not capturing:
            choice = dispatch.eager_choice(choice, m <= mmasp.MAX_M and mmasp.supports(self.values.dtype, k))
        keep = True
        if choice.path == "decode":
            cfg = choice.decode or s24.tuned_config(n, k, self.values.dtype, m)
            if cfg is None:  # not measured yet: measure now, unless capturing (no timing inside a graph)
                keep = not capturing
                cfg = s24.DEFAULT_CONFIG if capturing else s24.tune_config(n, k, self.values.dtype, m,
                                                                          self.values.device)
            run = s24.decode_runner(self.values, self.meta, bias, m, k, cfg)
        elif choice.path == "mmasp":
            op, L = torch.ops.llmprune_kernels.sparse24_mmasp_linear.default, self._mmasp_layout()
            cfg = choice.mmasp or mmasp.default_config(n, k, m)
            if not mmasp.config_fits(m, k, cfg):
                raise ValueError(f"mma.sp config {cfg} does not fit in_features={k}, M={m}")

            def run(x: torch.Tensor) -> torch.Tensor:
                if _no_autograd_needed(x, bias):
                    y = op.redispatch(_CUDA_KEYS, x.reshape(m, k), L.a_frag, L.e_frag, n, bias, *cfg)
                else:
                    y = op(x.reshape(m, k), L.a_frag, L.e_frag, n, bias, *cfg)
                return y if x.dim() == 2 else y.view(*x.shape[:-1], n)
        elif choice.path == "cusparselt":
            op, comp = torch.ops.llmprune_kernels.sparse24_cslt_linear.default, self._compressed()
            c = choice.cslt or cslt.DEFAULT_CONFIG
            args = (c.alg_id, c.split_k, c.split_k_mode, c.split_k_buffers)

            def fwd(x: torch.Tensor) -> torch.Tensor:
                y = op(x.reshape(m, k), comp, n, bias, *args)
                return y if x.dim() == 2 else y.view(*x.shape[:-1], n)
        elif choice.path == "cutlass":
            op = torch.ops.llmprune_kernels.sparse24_cutlass_linear.default
            tcfg, cw = self._cutlass_for(choice)

            def fwd(x: torch.Tensor) -> torch.Tensor:
                if x.dtype != cw.values.dtype:  # the op's own check would raise from C++ (see cutlass_sm90.linear)
                    raise TypeError(f"SparseLinear holds {cw.values.dtype} weights, got a {x.dtype} input")
                y = op(x.reshape(m, k), cw.values, cw.meta, n, bias, tcfg)
                return y if x.dim() == 2 else y.view(*x.shape[:-1], n)
        else:
            w = self._dense()

            def run(x: torch.Tensor) -> torch.Tensor:
                return F.linear(x, w, bias)
        if choice.path in ("cusparselt", "cutlass"):
            values, meta = self.values, self.meta

            def run(x: torch.Tensor) -> torch.Tensor:
                if _grad_can_flow(x, bias):
                    return _LibraryOpGrad.apply(x, bias, fwd, values, meta, k)
                return fwd(x)
        if keep:
            if len(self._runners) >= _MAX_RUNNERS:
                self._runners.clear()
            self._runners[(m, capturing)] = run
        return run

    def _forward_general(self, x: torch.Tensor) -> torch.Tensor:
        """CPU, torch.compile tracing, and anything the eager fast path does not cover."""
        m = x.numel() // self.in_features
        if not x.is_cuda and self.force_path != "decode":  # CPU: decode only when pinned (interpreter tests)
            return F.linear(x, self._dense(), self.bias)
        choice = self.choose(m) if x.is_cuda else dispatch.PINNED["decode"]
        if choice.path == "decode":
            if torch.compiler.is_compiling():
                return torch.ops.llmprune_kernels.sparse24_mm(x, self.values, self.meta, self.bias, self.in_features)
            return sparse24_mm(x, self.values, self.meta, self.bias, self.in_features,
                               block=choice.decode if x.is_cuda else None)
        if choice.path == "mmasp" and torch.compiler.is_compiling():
            # torch.compile of the mma.sp op fails on the H100 (a data-dependent guard, torch 2.11): compiled
            # graphs run the Triton decode op, which has a fake and an autograd formula.
            return torch.ops.llmprune_kernels.sparse24_mm(x, self.values, self.meta, self.bias, self.in_features)
        if choice.path == "mmasp":
            cfg = choice.mmasp or mmasp.default_config(self.out_features, self.in_features, m)
            return mmasp.mmasp_linear(x, self._mmasp_layout(), self.bias, cfg)
        if choice.path in ("cusparselt", "cutlass"):
            if not _grad_can_flow(x, self.bias):
                return self._library_linear(choice, x)
            if torch.compiler.is_compiling():
                # a traced graph that needs gradients runs the Triton decode op, which has an autograd formula
                return torch.ops.llmprune_kernels.sparse24_mm(x, self.values, self.meta, self.bias, self.in_features)
            return _LibraryOpGrad.apply(x, self.bias, lambda x: self._library_linear(choice, x), self.values, self.meta,
                                        self.in_features)
        return F.linear(x, self._dense(), self.bias)

    def _library_linear(self, choice: dispatch.Choice, x: torch.Tensor) -> torch.Tensor:
        """The cuSPARSELt or CUTLASS op (no autograd formula of its own) for any input shape."""
        x2 = x.reshape(-1, self.in_features)
        if choice.path == "cusparselt":
            y = cslt.linear(x2, self._compressed(), self.out_features, self.bias, choice.cslt or cslt.DEFAULT_CONFIG)
        else:
            tcfg, cw = self._cutlass_for(choice)
            y = ctl.linear(x2, cw, self.out_features, self.bias, tcfg)
        return y.reshape(*x.shape[:-1], self.out_features)


def _is_24(weight: torch.Tensor) -> bool:
    try:
        check_24(weight)
        return True
    except (ValueError, TypeError):
        return False


@torch.no_grad()
def sparsify_(
    model: nn.Module,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    tune: bool = True,
    table: dispatch.TuningTable | str | None = None,
    save_table: str | None = None,
    buckets: tuple[int, ...] = dispatch.BUCKETS,
    dense_tolerance: float = 0.0,
) -> nn.Module:
    """Swap the model's ``nn.Linear`` modules for :class:`SparseLinear` in place (torchao-style).

    ``filter_fn(module, fqn)`` picks the Linears; by default every Linear whose weight is 2:4-sparse
    (so an unpruned ``lm_head`` stays dense). A picked weight that is not 2:4 raises, naming the module,
    row and group. On CUDA each distinct (out, in, dtype) is tuned once (``tune=True``) unless ``table``
    (a :class:`TuningTable` or a JSON path from ``save_table``) already holds it; caches are then built.
    ``buckets``: the M buckets to measure (fewer = faster tuning; unmeasured buckets use the defaults).
    ``dense_tolerance`` in [0, 1): where dense measured fastest but a sparse path within this fraction of its
    time, run the sparse path and keep no dense copy of the weight (memory for up to that much speed).
    """
    dense_tolerance = dispatch.check_dense_tolerance(dense_tolerance)
    if isinstance(table, str):
        table = dispatch.TuningTable.load(table)
    picked: list[tuple[nn.Module, str, str, nn.Linear]] = []
    for fqn, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if filter_fn is None and not _is_24(mod.weight):
            continue
        if filter_fn is not None and not filter_fn(mod, fqn):
            continue
        parent_name, _, child = fqn.rpartition(".")
        picked.append((model.get_submodule(parent_name) if parent_name else model, child, fqn, mod))
    if isinstance(model, nn.Linear) and picked:
        raise ValueError("sparsify_ swaps Linear children of a model; wrap a bare Linear with SparseLinear.from_linear")
    new = []
    for parent, child, fqn, lin in picked:
        try:
            sl = SparseLinear.from_linear(lin)
        except ValueError as exc:
            raise ValueError(f"{fqn}: {exc}") from None
        sl.table = table
        sl.dense_tolerance = dense_tolerance
        setattr(parent, child, sl)
        new.append(sl)
    cuda_shapes = {(m.out_features, m.in_features, m.values.dtype) for m in new if m.values.is_cuda}
    if cuda_shapes and tune:
        t = dispatch.tune(sorted(cuda_shapes, key=str), table, device=new[0].values.device, buckets=buckets)
        if save_table:
            t.save(save_table)
    for m in new:
        m.prepare()
    return model
