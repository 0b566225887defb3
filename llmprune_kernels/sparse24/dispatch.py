"""Which 2:4 path runs a ``SparseLinear`` for M input rows: measured per weight shape, cached in a table.

Paths: ``decode`` (our Triton kernel on the packed weight, small M), ``mmasp`` (our CUDA kernel on the
sparse tensor cores, M <= 16, sm_90; :mod:`llmprune_kernels.sparse24.backends.mmasp`), ``cusparselt`` (our
extension's cached-plan cuSPARSELt op, large M), ``cutlass`` (CUTLASS's sm90 wgmma.sp GEMM, large M;
:mod:`llmprune_kernels.sparse24.backends.cutlass_sm90`) and ``dense`` (a dense copy of the masked weight, where
sparse would lose). M is rounded up to a power-of-two bucket; each bucket's path is measured on this GPU when the
model is sparsified (``tune_shape``), or comes from a saved JSON table (which also holds the decode
kernel's measured config, so a loaded table needs no re-measuring).
Timing replays a CUDA graph over several weight copies (more bytes than L2 holds), so a decode-sized
call is measured reading its weight from HBM, as it does in a real model.
A sparse path is chosen only when it beats dense by ``DISPATCH_MARGIN`` (``choose_path``): timing
noise (and picking the minimum over many noisy candidates) must not select a path slower than dense.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

from llmprune_kernels.sparse24.backends import decode as s24
from llmprune_kernels.sparse24.backends import mmasp as mmasp
from llmprune_kernels.sparse24.backends.decode import HAS_TRITON, sparse24_mm
from llmprune_kernels.sparse24.backends import cusparselt as cslt
from llmprune_kernels.sparse24.backends import cutlass_sm90 as ctl
from llmprune_kernels.sparse24.pack import pack_24
from llmprune_kernels.testing import random_24_weight

PATHS = ("dense", "decode", "cusparselt", "mmasp", "cutlass")
# mma.sp launch configs (warps, rows_per_warp, splits) measured per bucket besides the shape's default: the
# winners of the H100 sweep (benchmarks/results/sparse24_mmasp_h100.json)
MMASP_CONFIGS = ((4, 1, 2), (4, 1, 4), (8, 1, 2), (8, 1, 4), (8, 2, 4))
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
DECODE_MAX_M = 64  # the decode kernel is a candidate up to here; it is designed for M <= 16
# A sparse path must be at least 3% faster than dense in tuning, else dense runs. Repeated H100 timings
# of one call differ by a few percent, and the cuSPARSELt time is the minimum over up to 16 algorithms
# (biased low), so without a margin a path measured 2% "faster" could be slower in use (seen: 0.93x).
DISPATCH_MARGIN = 0.03
# Close calls (best sparse within [1 - RETIME_WINDOW, 1 + DISPATCH_MARGIN] of dense) are re-timed,
# dense and that path alternating, before choosing.
RETIME_WINDOW = 0.10
EPOCH = 0  # bumped whenever tuning results change, so SparseLinear drops its per-M dispatch cache


def bucket(m: int) -> int:
    """The smallest bucket >= m (the largest bucket for anything bigger)."""
    for b in BUCKETS:
        if m <= b:
            return b
    return BUCKETS[-1]


def shape_key(out_features: int, in_features: int, dtype: torch.dtype) -> str:
    return f"{out_features}x{in_features}:{str(dtype).removeprefix('torch.')}"


@dataclass
class Choice:
    """One bucket's path; ``decode``: the decode kernel config measured for it (``sparse24_mm``'s block);
    ``mmasp``: the mma.sp launch config (warps, rows_per_warp, splits) measured for it; ``cutlass``: the
    CUTLASS tile config measured for it."""

    path: str
    cslt: cslt.CsltConfig | None = None
    times_ms: dict[str, float] = field(default_factory=dict)
    decode: tuple | None = None
    mmasp: tuple | None = None
    cutlass: int | None = None

    def to_json(self) -> dict:
        d = {"path": self.path, "cslt": self.cslt.as_dict() if self.cslt else None, "times_ms": self.times_ms}
        if self.decode is not None:
            d["decode"] = list(self.decode)
            d["decode_kernel"] = s24.config_name(self.decode)  # for readers of the JSON
        if self.mmasp is not None:
            d["mmasp"] = list(self.mmasp)
        if self.cutlass is not None:
            d["cutlass"] = ctl.config_to_json(self.cutlass)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Choice":
        if d["path"] not in PATHS:
            raise ValueError(f"tuning table path {d['path']!r} is unknown; allowed: {PATHS}")
        return cls(d["path"], cslt.CsltConfig(**d["cslt"]) if d.get("cslt") else None, dict(d.get("times_ms", {})),
                   tuple(d["decode"]) if d.get("decode") else None,
                   mmasp.check_config(d["mmasp"]) if d.get("mmasp") else None,
                   ctl.config_from_json(d["cutlass"]) if d.get("cutlass") is not None else None)


def choose_path(times: dict[str, float], margin: float = DISPATCH_MARGIN) -> str:
    """The path to run, from measured times (ms; inf or absent = could not run): the fastest sparse path if
    it is at least ``margin`` (a fraction) faster than dense, else dense. Ties go to the earlier path in
    ``PATHS`` order, so the choice does not depend on dict order."""
    sparse = [(t, PATHS.index(p), p) for p, t in times.items() if p != "dense" and math.isfinite(t)]
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
    known = {"cusparselt": choice.cslt, "decode": choice.decode, "mmasp": choice.mmasp, "cutlass": choice.cutlass}
    if path == "dense" or known.get(path) is None:
        return choice
    return replace(choice, path=path)


def check_dense_tolerance(dense_tolerance: float) -> float:
    if not 0.0 <= dense_tolerance < 1.0:
        raise ValueError(f"dense_tolerance must be in [0, 1) (a fraction of dense's time), got {dense_tolerance!r}")
    return float(dense_tolerance)


def eager_choice(choice: Choice, mmasp_ok: bool) -> Choice:
    """The path for a call outside CUDA-graph capture. A Triton launch costs more host time than the decode
    kernel saves on a small layer (H100: 0.4-0.7x of dense per eager call at 4096x4096) while the C++ mma.sp
    op launches like ``F.linear``: a measured ``decode`` choice runs mma.sp instead where mma.sp was measured
    faster than dense by the margin and ``mmasp_ok`` (the op can run this call: built, sm_90, dtype, width,
    M <= 16). Anything else (pinned paths, no measurement) is kept."""
    if choice.path != "decode" or not mmasp_ok or choice.mmasp is None:
        return choice
    t = choice.times_ms
    pair = {"dense": t.get("dense", math.inf), "mmasp": t.get("mmasp", math.inf)}
    if not math.isfinite(pair["mmasp"]) or choose_path(pair) != "mmasp":
        return choice
    return replace(choice, path="mmasp", cslt=None)


def close_call(times: dict[str, float], margin: float = DISPATCH_MARGIN, window: float = RETIME_WINDOW) -> str | None:
    """The best sparse path when its time is too close to dense's to trust one measurement, else None."""
    sparse = {p: t for p, t in times.items() if p != "dense" and math.isfinite(t)}
    dense = times.get("dense", math.inf)
    if not sparse or not math.isfinite(dense):
        return None
    best = min(sparse, key=sparse.get)
    return best if dense * (1.0 - window) <= sparse[best] <= dense * (1.0 + margin) else None


class TuningTable:
    """``{shape_key: {bucket: Choice}}`` plus the GPU it was measured on; JSON round trip."""

    def __init__(self, entries: dict[str, dict[int, Choice]] | None = None, device_name: str | None = None):
        self.entries = entries or {}
        self.device_name = device_name

    def lookup(self, out_features: int, in_features: int, dtype: torch.dtype, m: int) -> Choice | None:
        per_shape = self.entries.get(shape_key(out_features, in_features, dtype))
        return None if per_shape is None else per_shape.get(bucket(m))

    def paths_for(self, out_features: int, in_features: int, dtype: torch.dtype,
                  dense_tolerance: float = 0.0) -> set[str]:
        """The paths this shape's buckets run (after ``lean_choice`` with ``dense_tolerance``)."""
        per_shape = self.entries.get(shape_key(out_features, in_features, dtype), {})
        return {lean_choice(c, dense_tolerance).path for c in per_shape.values()}

    def cutlass_formats(self, out_features: int, in_features: int, dtype: torch.dtype) -> set[int]:
        """The CUTLASS metadata formats this shape's tuned configs read ({0} when none is tuned)."""
        per_shape = self.entries.get(shape_key(out_features, in_features, dtype), {})
        return {ctl.format_of(c.cutlass) for c in per_shape.values() if c.cutlass is not None} or {0}

    def save(self, path: str) -> None:
        """Write atomically (temp file + rename)."""
        data = {"device_name": self.device_name,
                "entries": {k: {str(b): c.to_json() for b, c in v.items()} for k, v in self.entries.items()}}
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "TuningTable":
        global EPOCH
        with open(path) as f:
            data = json.load(f)
        entries = {k: {int(b): Choice.from_json(c) for b, c in v.items()} for k, v in data["entries"].items()}
        EPOCH += 1
        return cls(entries, data.get("device_name"))

    def install_decode_configs(self, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        """Make the decode configs this table holds for the shape the ones ``sparse24_mm`` uses (also
        under torch.compile, whose op call passes no config), so no call measures them again."""
        for b, c in self.entries.get(shape_key(out_features, in_features, dtype), {}).items():
            if c.decode is not None:
                s24.set_tuned_config(out_features, in_features, dtype, b, c.decode)


DEFAULT_TABLE = TuningTable()
PINNED = {p: Choice(p) for p in PATHS}  # shared constants: forward never builds objects (torch.compile)


def default_choice(out_features: int, in_features: int, dtype: torch.dtype, m: int, device: torch.device) -> Choice:
    """Without a measurement: mma.sp (else the Triton decode kernel) for M <= 16, cuSPARSELt above when it
    can run, else dense."""
    if device.type != "cuda":
        return PINNED["dense"]
    if m <= mmasp.MAX_M and mmasp.supports(dtype, in_features):
        return PINNED["mmasp"]
    if m <= 16 and HAS_TRITON:
        return PINNED["decode"]
    if cslt.available() and cslt.shape_ok(out_features, in_features, dtype):
        return PINNED["cusparselt"]
    return PINNED["dense"]


def _replayer(fns, reps: int, graph: bool) -> Callable[[], None]:
    """``reps`` calls cycling through ``fns`` (warmed up), as one CUDA graph replay when ``graph``."""
    fns = list(fns)
    for f in fns:  # warm-up: Triton autotune, cuSPARSELt plan creation, allocator
        f()
    torch.cuda.synchronize()
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(reps):
                fns[i % len(fns)]()
        run = g.replay
    else:
        def run():
            for i in range(reps):
                fns[i % len(fns)]()
    run()
    torch.cuda.synchronize()
    return run


def time_ms_interleaved(groups, reps: int = 20, graph: bool = True, trials: int = 5) -> list[float]:
    """Median time of one call for each list of ``fns`` in ``groups``, the groups replayed in turn within
    every trial, so clock and power drift over the run weigh on all of them alike."""
    runs = [_replayer(fns, reps, graph) for fns in groups]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(trials):
        for run, t in zip(runs, times):
            start.record()
            run()
            end.record()
            end.synchronize()
            t.append(start.elapsed_time(end) / reps)
    return [statistics.median(t) for t in times]


def time_ms(fns, reps: int = 20, graph: bool = True, trials: int = 5) -> float:
    """Median time of one call, cycling through ``fns``; replayed as a CUDA graph when ``graph``."""
    return time_ms_interleaved([fns], reps=reps, graph=graph, trials=trials)[0]


def weight_copies(nbytes_sparse: int, device) -> int:
    """Enough weight copies that one pass reads more bytes than twice the L2 cache (max 8)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(1, min(8, math.ceil(2 * l2 / max(nbytes_sparse, 1))))


def _retime(cands: dict[str, list], reps: int, rounds: int = 3) -> dict[str, float]:
    """Medians of interleaved measurements of each path (drift hits all paths alike)."""
    names = list(cands)
    return dict(zip(names, time_ms_interleaved([cands[p] for p in names], reps=reps, trials=5 * rounds)))


@torch.no_grad()
def tune_shape(out_features: int, in_features: int, dtype: torch.dtype, device="cuda",
               buckets=BUCKETS, reps: int = 10) -> dict[int, Choice]:
    """Measure every applicable path for each M bucket on random 2:4 weights of this shape and choose
    with ``choose_path`` (close calls re-timed first). The decode kernel's config is measured per bucket
    (``tune_config``) and kept in the Choice."""
    device = torch.device(device)
    dense = [random_24_weight(out_features, in_features, dtype, device)]
    packed = [pack_24(dense[0])]
    n = weight_copies(packed[0].nbytes(), device)
    for _ in range(n - 1):
        dense.append(random_24_weight(out_features, in_features, dtype, device))
        packed.append(pack_24(dense[-1]))
    use_cslt = cslt.available() and cslt.shape_ok(out_features, in_features, dtype)
    comp = [cslt.compress(w) for w in dense] if use_cslt else []
    use_mmasp = mmasp.supports(dtype, in_features)
    layouts = [mmasp.to_mmasp_layout(p) for p in packed] if use_mmasp else []
    use_ctl = ctl.available(device) and ctl.shape_ok(out_features, in_features, dtype)
    ctl_w = {f: [ctl.compress(w, f) for w in dense] for f in ctl.FORMATS} if use_ctl else {}
    name = shape_key(out_features, in_features, dtype)
    choices = {}
    for m in buckets:
        x = torch.randn(m, in_features, device=device, dtype=dtype)
        cands = {"dense": [lambda w=w, x=x: F.linear(x, w) for w in dense]}
        dcfg = None
        if HAS_TRITON and m <= DECODE_MAX_M:
            try:
                dcfg = s24.tune_config(out_features, in_features, dtype, m, device)
                cands["decode"] = [lambda p=p, x=x, c=dcfg: sparse24_mm(x, p.values, p.meta, None, in_features,
                                                                         block=c) for p in packed]
            except Exception as exc:  # no decode config runs this shape: the path does not compete
                print(f"sparse24 tuning: decode config search failed for {name} M={m}: {exc}")
        times, cfg, mcfg, tcfg = {}, None, None, None
        if use_mmasp and m <= mmasp.MAX_M:
            try:
                mcfg, times["mmasp"] = _tune_mmasp(layouts, x, out_features, reps)
                cands["mmasp"] = [lambda L=L, x=x, c=mcfg: mmasp.mmasp_linear(x, L, None, c) for L in layouts]
            except Exception as exc:  # the path does not compete
                print(f"sparse24 tuning: mmasp failed for {name} M={m}: {exc}")
        if use_cslt:
            try:
                cfg, times["cusparselt"], _ = cslt.search(
                    x, comp, out_features, lambda fns: time_ms(fns, reps=reps, trials=3))
                cands["cusparselt"] = [lambda c=c, x=x, g=cfg: cslt.linear(x, c, out_features, None, g) for c in comp]
            except RuntimeError as exc:
                print(f"sparse24 tuning: cusparselt failed for {name} M={m}: {exc}")
        if use_ctl and m >= ctl.MIN_M:
            try:
                tcfg, times["cutlass"], _ = ctl.search(x, ctl_w, out_features,
                                                       lambda fns: time_ms(fns, reps=reps, trials=3))
                cands["cutlass"] = [lambda w=w, x=x, c=tcfg: ctl.linear(x, w, out_features, None, c)
                                    for w in ctl_w[ctl.format_of(tcfg)]]
            except RuntimeError as exc:
                print(f"sparse24 tuning: cutlass failed for {name} M={m}: {exc}")
        for path, fns in cands.items():
            if path in times:
                continue
            try:
                times[path] = time_ms(fns, reps=reps)
            except Exception as exc:  # a path that cannot run this shape simply does not compete
                times[path] = float("inf")
                print(f"sparse24 tuning: {path} failed for {name} M={m}: {exc}")
        close = close_call(times)
        if close is not None:  # re-measure dense and the contender alternately, without selection bias
            times.update(_retime({"dense": cands["dense"], close: cands[close]}, reps))
        best = choose_path(times)
        # the cuSPARSELt / CUTLASS configs are kept even where another path won, so lean_choice can run them
        choices[m] = Choice(best, cfg, times, dcfg if "decode" in cands else None, mcfg, tcfg)
    return choices


def _tune_mmasp(layouts, x, out_features: int, reps: int) -> tuple[tuple, float]:
    """The fastest fitting mma.sp config for ``x``'s M (the shape's default and ``MMASP_CONFIGS``)."""
    m, k = x.shape
    configs = dict.fromkeys((mmasp.default_config(out_features, k, m),) + MMASP_CONFIGS)
    times = {}
    for c in configs:
        if mmasp.config_fits(m, k, c):
            times[c] = time_ms([lambda L=L, c=c: mmasp.mmasp_linear(x, L, None, c) for L in layouts], reps=reps)
    best = min(times, key=times.get)
    return best, times[best]


def tune(shapes, table: TuningTable | None = None, device="cuda", buckets=BUCKETS) -> TuningTable:
    """Tune every ``(out, in, dtype)`` in ``shapes`` not yet in ``table`` (default: the process table)."""
    global EPOCH
    table = DEFAULT_TABLE if table is None else table
    table.device_name = torch.cuda.get_device_name(torch.device(device))
    for out_features, in_features, dtype in shapes:
        key = shape_key(out_features, in_features, dtype)
        if key not in table.entries:
            table.entries[key] = tune_shape(out_features, in_features, dtype, device, buckets)
            EPOCH += 1
    return table
