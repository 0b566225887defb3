"""The interface every 2:4 matmul backend implements, and the registry dispatch and tuning iterate.

A backend computes ``y = x @ W.T (+ bias)`` for a frozen 2:4 weight ``W`` held as a
:class:`~llmprune_kernels.sparse24.pack.Packed24`. It declares what it serves (device, shapes, dtypes, M),
builds its own weight layout once (``prepare``), names the launch configs tuning measures
(``candidates`` / ``tune``) and binds one call per M (``bind``), which ``SparseLinear`` keeps and replays.
Gradients never come from a backend: ``SparseLinear`` wraps every bound call in one autograd formula
(:mod:`llmprune_kernels.sparse24.autograd`).

Adding a backend: a module in this folder with a ``Backend`` subclass, its csrc file if it is compiled
(schema and fake in :mod:`llmprune_kernels.library`), and one ``register(...)`` line in ``__init__.py``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from llmprune_kernels.sparse24.pack import Packed24

Runner = Callable[[torch.Tensor], torch.Tensor]
TimeFn = Callable[..., float]  # time_fn(fns, trials=5) -> median ms of one call, cycling through fns


class Backend:
    """One way to run a 2:4 Linear. Subclasses set ``name`` and override what differs from the defaults."""

    name: ClassVar[str] = ""
    min_m: ClassVar[int] = 1  # the M range it can run
    max_m: ClassVar[int | None] = None
    tune_max_m: ClassVar[int | None] = None  # tuning measures it up to this M (default: max_m)
    tune_min_m: ClassVar[int] = 1
    # without a measurement, backends with a priority are tried in ascending order for M <= default_max_m
    default_priority: ClassVar[int | None] = None
    default_max_m: ClassVar[int | None] = None
    # an eager (not graph-captured) call runs this backend instead, where it was measured faster than dense:
    # for a backend whose launch costs more host time than it saves outside a CUDA graph
    eager_substitute: ClassVar[str | None] = None
    traceable: ClassVar[bool] = True  # ``call`` works under torch.compile (its op has a fake)
    differentiable: ClassVar[bool] = False  # its calls carry autograd themselves (else the shared formula wraps them)
    traced_grad: ClassVar[bool] = False  # its torch.compile op has the frozen-weight gradient registered
    quantized: ClassVar[bool] = False  # prepares from the 8-bit packing (quant8.Packed24Q8), not the 16-bit one

    # -- what it serves ---------------------------------------------------------------------------------
    def available(self, device: torch.device) -> bool:
        """Built and runnable on ``device`` (a CUDA device for every compiled or Triton backend)."""
        return device.type == "cuda"

    def supports(self, out_features: int, in_features: int, dtype: torch.dtype) -> bool:
        """The weight shapes and dtypes it runs."""
        return dtype in (torch.float16, torch.bfloat16)

    def serves(self, m: int) -> bool:
        return m >= self.min_m and (self.max_m is None or m <= self.max_m)

    def tuned_m_range(self) -> tuple[int, float]:
        """The M range where tuning measures this backend (outside it, it runs only when pinned)."""
        return self.tune_min_m, self.tune_max_m or self.max_m or float("inf")

    def usable(self, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device) -> bool:
        return self.available(device) and self.supports(out_features, in_features, dtype)

    def accepts(self, x_dtype: torch.dtype, group_size: int | None = None) -> bool:
        """Whether it runs activations of ``x_dtype`` on an (8-bit) weight with ``group_size`` scales."""
        return True

    # -- weight layout and configs ----------------------------------------------------------------------
    def state_key(self, config: Any) -> Any:
        """Which prepared layout a config reads (most backends: one layout for every config)."""
        return None

    def prepare(self, packed: Packed24, config: Any = None) -> Any:
        """This backend's layout of the weight (built once per module and layout key)."""
        return packed

    def candidates(self, out_features: int, in_features: int, dtype: torch.dtype, m: int) -> Sequence[Any]:
        """The configs ``tune`` measures for M rows."""
        return [None]

    def default_config(self, out_features: int, in_features: int, dtype: torch.dtype, m: int) -> Any:
        """The config used where the tuning table holds none."""
        return None

    def resolve(self, config: Any, out_features: int, in_features: int, dtype: torch.dtype, m: int,
                device: torch.device, capturing: bool) -> tuple[Any, bool]:
        """(config to run, whether a runner bound with it may be kept for later calls)."""
        return (config if config is not None else self.default_config(out_features, in_features, dtype, m)), True

    def install(self, config: Any, out_features: int, in_features: int, dtype: torch.dtype, m: int) -> None:
        """Make a config from a loaded tuning table known to the backend (hook; most need nothing)."""

    def describe(self, config: Any) -> str | None:
        """A config in words, for reports and saved tables (None: nothing to add)."""
        return None

    def config_to_json(self, config: Any) -> Any:
        return list(config) if isinstance(config, tuple) else config

    def config_from_json(self, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    # -- calls --------------------------------------------------------------------------------------------
    def bind(self, state: Any, config: Any, m: int, in_features: int, out_features: int,
             bias: torch.Tensor | None) -> Runner:
        """A call for inputs ``[..., in_features]`` with exactly ``m`` rows, every launch argument bound now."""
        raise NotImplementedError

    def call(self, state: Any, config: Any, x: torch.Tensor, out_features: int,
             bias: torch.Tensor | None) -> torch.Tensor:
        """One call for any input shape (torch.compile tracing and other non-cached calls)."""
        m = x.numel() // x.shape[-1]
        return self.bind(state, config, m, x.shape[-1], out_features, bias)(x)

    # -- tuning -------------------------------------------------------------------------------------------
    def tuning_states(self, packed: Sequence[Packed24]) -> Any:
        """Layouts of the tuning weight copies, built once per shape."""
        return [self.prepare(p) for p in packed]

    def tune(self, states: Any, x: torch.Tensor, out_features: int, time_fn: TimeFn
             ) -> tuple[Any, float | None, list[Callable[[], Any]]]:
        """Measure ``candidates`` on ``x`` (cycling through the weight copies); return (best config, its time in
        ms or None to let the caller time the calls, the calls of the best config)."""
        m, k = x.shape
        times, fns = {}, {}
        for cfg in self.candidates(out_features, k, x.dtype, m):
            fns[cfg] = [lambda s=s, c=cfg: self.bind(s, c, m, k, out_features, None)(x) for s in states]
            times[cfg] = time_fn(fns[cfg])
        best = min(times, key=times.get)
        return best, times[best], fns[best]


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add a backend; its position in the registry breaks ties between equal measured times."""
    if not backend.name or backend.name in _REGISTRY:
        raise ValueError(f"backend name {backend.name!r} is empty or already registered ({', '.join(_REGISTRY)})")
    _REGISTRY[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown 2:4 backend {name!r}; registered: {', '.join(_REGISTRY)}") from None


def names() -> tuple[str, ...]:
    """Registered backend names, in registry order."""
    return tuple(_REGISTRY)


def registered() -> tuple[Backend, ...]:
    return tuple(_REGISTRY.values())
