"""Which 2:4 backend runs a ``SparseLinear`` for M input rows: measured per weight shape, kept in a table.

Backends (:mod:`llmprune_kernels.sparse24.backends`) are iterated in registry order, never named here. M is
rounded up to a power-of-two bucket; each bucket's backend is measured on this GPU when the model is
sparsified (:mod:`llmprune_kernels.sparse24.tuning`), or read from a saved JSON table (which also holds each
backend's measured launch config, so a loaded table needs no re-measuring).
A sparse backend is chosen only when it beats dense by ``DISPATCH_MARGIN`` (``choose_path``): timing noise
(and picking the minimum over many noisy candidates) must not select a path slower than dense.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from llmprune_kernels.atomic import atomic_file
from llmprune_kernels.sparse24 import backends

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# A sparse path must be at least 3% faster than dense in tuning, else dense runs. Repeated H100 timings
# of one call differ by a few percent, and the cuSPARSELt time is the minimum over up to 16 algorithms
# (biased low), so without a margin a path measured 2% "faster" could be slower in use (seen: 0.93x).
DISPATCH_MARGIN = 0.03
# Close calls (best sparse within [1 - RETIME_WINDOW, 1 + DISPATCH_MARGIN] of dense) are re-timed,
# dense and that path alternating, before choosing.
RETIME_WINDOW = 0.10
EPOCH = 0  # bumped whenever tuning results change, so SparseLinear drops its per-M runners
_LEGACY_KEYS = {"decode": "decode", "mmasp": "mmasp", "cslt": "cusparselt", "cutlass": "cutlass"}


def bucket(m: int) -> int:
    """The smallest bucket >= m (the largest bucket for anything bigger)."""
    for b in BUCKETS:
        if m <= b:
            return b
    return BUCKETS[-1]


def bump_epoch() -> None:
    global EPOCH
    EPOCH += 1


def shape_key(out_features: int, in_features: int, dtype: torch.dtype) -> str:
    return f"{out_features}x{in_features}:{str(dtype).removeprefix('torch.')}"


def act8_key(out_features: int, in_features: int, dtype: torch.dtype, qdtype: torch.dtype) -> str:
    """The table key of an 8-bit-activation choice (``tuning8``): cslt8 or the 16-bit fallback, per bucket."""
    return f"{shape_key(out_features, in_features, dtype)}/a8:{str(qdtype).removeprefix('torch.')}"


def q8_key(out_features: int, in_features: int, dtype: torch.dtype, qdtype: torch.dtype) -> str:
    """The table key of an 8-bit weight's decode choice (``tuning8``): which 8-bit backend runs M <= 16."""
    return f"{shape_key(out_features, in_features, dtype)}/q8:{str(qdtype).removeprefix('torch.')}"


@dataclass(frozen=True)
class Choice:
    """One bucket's backend (``path``), every backend's measured time (ms) and the launch config measured for
    each backend that has configs (kept even where another backend won, so ``lean_choice`` can run it)."""

    path: str
    times_ms: dict[str, float] = field(default_factory=dict)
    configs: dict[str, Any] = field(default_factory=dict)

    def config(self, path: str | None = None) -> Any:
        return self.configs.get(self.path if path is None else path)

    def to_json(self) -> dict:
        labels = {p: backends.get(p).describe(c) for p, c in self.configs.items()}
        return {"path": self.path, "times_ms": self.times_ms,
                "configs": {p: backends.get(p).config_to_json(c) for p, c in self.configs.items()},
                "labels": {p: text for p, text in labels.items() if text}}  # for readers of the JSON

    @classmethod
    def from_json(cls, d: dict) -> "Choice":
        if d["path"] not in backends.names():
            raise ValueError(f"tuning table path {d['path']!r} is unknown; allowed: {backends.names()}")
        raw = dict(d.get("configs") or {})
        for old, new in _LEGACY_KEYS.items():  # tables written with one key per backend
            if d.get(old) is not None:
                raw.setdefault(new, d[old])
        configs = {p: backends.get(p).config_from_json(v) for p, v in raw.items() if v is not None}
        return cls(d["path"], dict(d.get("times_ms", {})), configs)


# one shared choice per backend, made now for the built-in ones: a first pinned() inside a torch.compile trace
# would otherwise add to this dict, which the trace guards on (one recompile of every compiled forward)
_PINNED: dict[str, Choice] = {b.name: Choice(b.name) for b in backends.registered()}


def pinned(path: str) -> Choice:
    """The measurement-free choice of one backend, one shared object per name (forward builds no objects)."""
    c = _PINNED.get(path)
    if c is None:
        c = _PINNED[path] = Choice(backends.get(path).name)
    return c


def choose_path(times: dict[str, float], margin: float = DISPATCH_MARGIN) -> str:
    """The path to run, from measured times (ms; inf or absent = could not run): the fastest sparse path if
    it is at least ``margin`` (a fraction) faster than dense, else dense. Ties go to the earlier backend in
    registry order, so the choice does not depend on dict order."""
    order = backends.names()
    sparse = [(t, order.index(p) if p in order else len(order), p) for p, t in times.items()
              if p != "dense" and math.isfinite(t)]
    if not sparse:
        return "dense"
    t_best, _, best = min(sparse)
    dense = times.get("dense", math.inf)
    if not math.isfinite(dense):
        return best
    return best if t_best <= dense * (1.0 - margin) else "dense"


def lean_choice(choice: Choice, dense_tolerance: float) -> Choice:
    """Memory-lean dispatch: a bucket where dense measured fastest runs its fastest sparse path instead when
    that path was measured within ``dense_tolerance`` (a fraction: 0.05 = up to 5% slower) of dense, so the
    module needs no dense copy of its weight for it (a dense copy is 1.78x the packed weight's bytes).
    Only a path whose measured config the choice holds is taken; anything else is kept."""
    if dense_tolerance <= 0 or choice.path != "dense":
        return choice
    path = choose_path(choice.times_ms, margin=-dense_tolerance)
    if path == "dense" or choice.configs.get(path) is None:
        return choice
    return replace(choice, path=path)


def check_dense_tolerance(dense_tolerance: float) -> float:
    if not 0.0 <= dense_tolerance < 1.0:
        raise ValueError(f"dense_tolerance must be in [0, 1) (a fraction of dense's time), got {dense_tolerance!r}")
    return float(dense_tolerance)


def eager_choice(choice: Choice, m: int, out_features: int, in_features: int, dtype: torch.dtype,
                 device: torch.device) -> Choice:
    """The path for a call outside CUDA-graph capture: a backend that declares an ``eager_substitute`` gives
    way to it where the substitute was measured (its config is in the choice) faster than dense by the
    margin and can run this call. Anything else (pinned paths, no measurement) is kept."""
    sub_name = backends.get(choice.path).eager_substitute
    if sub_name is None or choice.configs.get(sub_name) is None:
        return choice
    sub = backends.get(sub_name)
    if not (sub.serves(m) and sub.usable(out_features, in_features, dtype, device)):
        return choice
    t = choice.times_ms
    pair = {"dense": t.get("dense", math.inf), sub_name: t.get(sub_name, math.inf)}
    if not math.isfinite(pair[sub_name]) or choose_path(pair) != sub_name:
        return choice
    return replace(choice, path=sub_name)


def close_call(times: dict[str, float], margin: float = DISPATCH_MARGIN, window: float = RETIME_WINDOW) -> str | None:
    """The best sparse path when its time is too close to dense's to trust one measurement, else None."""
    sparse = {p: t for p, t in times.items() if p != "dense" and math.isfinite(t)}
    dense = times.get("dense", math.inf)
    if not sparse or not math.isfinite(dense):
        return None
    best = min(sparse, key=sparse.get)
    return best if dense * (1.0 - window) <= sparse[best] <= dense * (1.0 + margin) else None


def default_choice(out_features: int, in_features: int, dtype: torch.dtype, m: int, device: torch.device) -> Choice:
    """Without a measurement: the backends that declare a default priority, in that order, where they can run
    this call (mma.sp, then the Triton decode kernel, for M <= 16; cuSPARSELt), else dense."""
    if device.type != "cuda":
        return pinned("dense")
    ranked = sorted((b for b in backends.registered() if b.default_priority is not None),
                    key=lambda b: b.default_priority)
    for b in ranked:
        if (b.default_max_m is None or m <= b.default_max_m) and b.serves(m) and b.usable(
                out_features, in_features, dtype, device):
            return pinned(b.name)
    return pinned("dense")


class TuningTable:
    """``{shape_key: {bucket: Choice}}`` plus the GPU it was measured on; JSON round trip."""

    def __init__(self, entries: dict[str, dict[int, Choice]] | None = None, device_name: str | None = None):
        self.entries = entries or {}
        self.device_name = device_name

    def lookup(self, out_features: int, in_features: int, dtype: torch.dtype, m: int) -> Choice | None:
        per_shape = self.entries.get(shape_key(out_features, in_features, dtype))
        return None if per_shape is None else per_shape.get(bucket(m))

    def lookup_key(self, key: str, m: int) -> Choice | None:
        return self.entries.get(key, {}).get(bucket(m))

    def choices(self, out_features: int, in_features: int, dtype: torch.dtype) -> dict[int, Choice]:
        return self.entries.get(shape_key(out_features, in_features, dtype), {})

    def paths_for(self, out_features: int, in_features: int, dtype: torch.dtype,
                  dense_tolerance: float = 0.0) -> set[str]:
        """The paths this shape's buckets run (after ``lean_choice`` with ``dense_tolerance``)."""
        return {lean_choice(c, dense_tolerance).path for c in self.choices(out_features, in_features, dtype).values()}

    def configs_for(self, path: str, out_features: int, in_features: int, dtype: torch.dtype) -> list[Any]:
        """Every config this shape's buckets hold for ``path`` ([None] when none is tuned)."""
        found = [c.configs[path] for c in self.choices(out_features, in_features, dtype).values() if path in c.configs]
        return found or [None]

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> None:
        """Write atomically (temporary sibling + rename, :mod:`llmprune_kernels.atomic`).

        ``overwrite=True`` (the default: a table is a cache that ``sparsify_(table=p, save_table=p)`` extends
        in place) replaces an existing file; ``overwrite=False`` refuses it (FileExistsError)."""
        data = {"device_name": self.device_name,
                "entries": {k: {str(b): c.to_json() for b, c in v.items()} for k, v in self.entries.items()}}
        text = json.dumps(data, indent=1)
        with atomic_file(path, overwrite=overwrite) as tmp:
            tmp.write_text(text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TuningTable":
        """Read a table written by ``save``; a malformed file raises ValueError naming the file and entry."""
        path = os.path.expanduser(os.fspath(path))
        with open(path) as f:
            try:
                data = json.load(f)
            except ValueError as exc:
                raise ValueError(f"tuning table {path!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            raise ValueError(f"tuning table {path!r} has no 'entries' object; allowed: a file written by "
                             f"TuningTable.save")
        entries: dict[str, dict[int, Choice]] = {}
        for k, v in data["entries"].items():
            if not isinstance(v, dict):
                raise ValueError(f"tuning table {path!r}: entries[{k!r}] is {type(v).__name__}; allowed: "
                                 f"an object of bucket -> choice")
            for b, c in v.items():
                try:
                    entries.setdefault(k, {})[int(b)] = Choice.from_json(c)
                except (KeyError, TypeError, ValueError, AttributeError) as exc:
                    raise ValueError(f"tuning table {path!r}: entries[{k!r}][{b!r}]: "
                                     f"{type(exc).__name__}: {exc}") from exc
        bump_epoch()
        return cls(entries, data.get("device_name"))

    def install(self, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        """Hand the configs this table holds for the shape to their backends (e.g. the decode kernel's, which
        its torch.compile op reads since the op call passes no config), so no call measures them again."""
        for b, c in self.choices(out_features, in_features, dtype).items():
            for path, cfg in c.configs.items():
                backends.get(path).install(cfg, out_features, in_features, dtype, b)


DEFAULT_TABLE = TuningTable()
