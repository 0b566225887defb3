"""``SparseLinear``: a drop-in ``nn.Linear`` holding a packed 2:4 weight (``sparsify`` swaps them in).

Forward is ``F.linear(x, W, bias)`` with ``W`` the masked dense weight, whatever backend runs it
(:mod:`llmprune_kernels.sparse24.backends`):

* CPU: the masked dense matmul (the reference), so CI checks the semantics;
* CUDA: per M bucket, the backend measured fastest for this weight shape at ``sparsify_`` time (or read
  from a saved tuning table, :mod:`llmprune_kernels.sparse24.dispatch`).

The packed ``values`` / ``meta`` buffers are the state (``state_dict``); each backend's layout of the weight
(cuSPARSELt's or CUTLASS's compressed copy, the mma.sp fragment order, a dense copy) is a cache rebuilt by
``prepare()`` after a device or dtype move. Call ``prepare()`` (``sparsify_`` does) before capturing a CUDA
graph or ``torch.compile``.

Eager CUDA calls take a fast path: the first call with a given M resolves the dispatch (table lookup, config,
layout, launch arguments) into a small callable kept per M (``Backend.bind``), so later calls only launch.
Gradients for x and bias come from one formula for every backend (:mod:`llmprune_kernels.sparse24.autograd`).
The per-M runners are dropped on device / dtype moves, ``load_state_dict``, ``prepare()``, when ``table`` /
``force_path`` / a weight attribute is reassigned, and when tuning results change.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from llmprune_kernels.sparse24 import backends, dispatch
from llmprune_kernels.sparse24.autograd import grad_can_flow, with_frozen_grad
from llmprune_kernels.sparse24.pack import Packed24, check_24, meta_width, pack_24, unpack_24

_RUNNER_KEYS = frozenset({"values", "meta", "bias", "table", "force_path", "dense_tolerance"})  # reassigning one drops the runners
_MAX_RUNNERS = 64  # distinct M values kept (prefill lengths vary; decode repeats one M)


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with a 2:4-sparse ``W`` stored packed (see :mod:`llmprune_kernels.sparse24.pack`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        # (M, capturing a CUDA graph) -> bound CUDA call: eager calls and graph captures may take other paths
        self._runners: dict[tuple[int, bool], Callable[[torch.Tensor], torch.Tensor]] = {}
        self._epoch = dispatch.EPOCH
        for what, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"SparseLinear {what} {v!r} is invalid; allowed: an integer >= 0")
        if in_features % 4 != 0 or in_features == 0:
            raise ValueError(f"SparseLinear needs in_features to be a positive multiple of 4 (2:4), got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, device=device, dtype=dtype))
        self.register_buffer("meta", torch.full((out_features, meta_width(in_features)), 0x44, device=device,
                                                dtype=torch.uint8))  # all groups keep columns (0, 1)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.table: dispatch.TuningTable | None = None  # None: the process-wide dispatch.DEFAULT_TABLE
        self._cache: dict[tuple[str, Any], Any] = {}  # (backend, layout key) -> that backend's weight layout
        self.force_path: str | None = None  # pin one backend (tests, benchmarks)
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
        if name == "force_path" and value is not None:
            backends.get(value)  # an unknown name raises here, naming the registered ones
        super().__setattr__(name, value)
        if name in _RUNNER_KEYS and "_runners" in self.__dict__:
            self._runners.clear()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_runners"] = {}  # bound calls reference this instance's tensors: never copied or pickled
        return state

    def _apply(self, fn, recurse=True):
        self._cache.clear()  # layouts belong to the old device / dtype
        self._runners.clear()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache.clear()
        self._runners.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _table(self) -> dispatch.TuningTable:
        return self.table if self.table is not None else dispatch.DEFAULT_TABLE

    def _shape(self) -> tuple[int, int, torch.dtype]:
        return self.out_features, self.in_features, self.values.dtype

    def choose(self, m: int) -> dispatch.Choice:
        """The backend for M input rows on this module's device: a pinned backend where it can take this call
        (else dense), else the tuning table's choice, else the defaults (dense off CUDA)."""
        dev = self.values.device
        if self.force_path is not None:
            b = backends.get(self.force_path)
            return dispatch.pinned(b.name if b.serves(m) and b.available(dev) else "dense")
        if dev.type != "cuda":
            return dispatch.pinned("dense")
        c = self._table().lookup(*self._shape(), m)
        if c is not None:
            return dispatch.lean_choice(c, self.dense_tolerance)
        return dispatch.default_choice(*self._shape(), m, dev)

    def layout(self, path: str, config: Any = None) -> Any:
        """Backend ``path``'s layout of the weight for ``config`` (built once, then cached)."""
        b = backends.get(path)
        key = (path, b.state_key(config))
        state = self._cache.get(key)
        if state is None:
            state = b.prepare(self._layout_source(b), config)
            if not torch.compiler.is_compiling():  # traced: no cache side effect
                self._cache[key] = state
        return state

    def _layout_source(self, backend) -> Any:
        """What ``backend.prepare`` builds its layout from: the packed 2:4 weight."""
        return self.packed()

    @torch.no_grad()
    def prepare(self, paths: set[str] | None = None) -> "SparseLinear":
        """Build the layouts the dispatch table will need (or ``paths``), so no call pays setup later."""
        self._runners.clear()
        if self.values.device.type != "cuda":
            self.layout("dense")
            return self
        table = self._table()
        table.install(*self._shape())
        if paths is None:
            paths = table.paths_for(*self._shape(), self.dense_tolerance)
            paths |= {dispatch.default_choice(*self._shape(), m, self.values.device).path for m in (1, 4096)}
            if self.force_path:  # a pinned backend runs dense above its M limit
                paths |= {self.force_path} | ({"dense"} if backends.get(self.force_path).max_m else set())
        for path in paths:
            b = backends.get(path)
            if b.usable(*self._shape(), self.values.device):
                for cfg in table.configs_for(path, *self._shape()):
                    self.layout(path, cfg)
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
        """Resolve this M's dispatch into a bound call, for graph capture or for eager calls (where a backend
        may give way to its ``eager_substitute``: ``dispatch.eager_choice``)."""
        if self.values.device.type != "cuda":  # a CUDA input to a CPU module: let F.linear report it
            return self._forward_general
        choice = self.choose(m)
        if not capturing:
            choice = self._eager(choice, m)
        b = backends.get(choice.path)
        config, keep = b.resolve(choice.config(), *self._shape(), m, self.values.device, capturing)
        fwd = b.bind(self.layout(choice.path, config), config, m, self.in_features, self.out_features, self.bias)
        run = fwd if b.differentiable else with_frozen_grad(fwd, self.values, self.meta, self.in_features, self.bias)
        if keep:
            if len(self._runners) >= _MAX_RUNNERS:
                self._runners.clear()
            self._runners[(m, capturing)] = run
        return run

    def _eager(self, choice: dispatch.Choice, m: int) -> dispatch.Choice:
        """The path of an eager call (``dispatch.eager_choice``)."""
        return dispatch.eager_choice(choice, m, *self._shape(), self.values.device)

    def _forward_general(self, x: torch.Tensor) -> torch.Tensor:
        """CPU, torch.compile tracing, and anything the eager fast path does not cover."""
        choice = self.choose(x.numel() // self.in_features)
        b = backends.get(choice.path)
        if torch.compiler.is_compiling() and (not b.traceable or (
                grad_can_flow(x, self.bias) and not (b.differentiable or b.traced_grad))):
            # compiled graphs that cannot trace this backend, or need gradients its op lacks, run the decode op,
            # which has a fake and an autograd formula
            choice, b = dispatch.pinned("decode"), backends.get("decode")
        config = choice.config()
        state = self.layout(choice.path, config)
        if b.differentiable or torch.compiler.is_compiling() or not grad_can_flow(x, self.bias):
            return b.call(state, config, x, self.out_features, self.bias)
        fwd = lambda x: b.call(state, config, x, self.out_features, self.bias)  # noqa: E731
        return with_frozen_grad(fwd, self.values, self.meta, self.in_features, self.bias)(x)


def _is_24(weight: torch.Tensor) -> bool:
    try:
        check_24(weight)
        return True
    except (ValueError, TypeError):
        return False
