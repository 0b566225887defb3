"""Measure every 2:4 backend per weight shape and M bucket on this GPU, and fill a dispatch table.

Timing replays a CUDA graph over several weight copies (more bytes than L2 holds), so a decode-sized
call is measured reading its weight from HBM, as it does in a real model. Each backend measures its own
launch configs (``Backend.tune``); the choice between backends is ``dispatch.choose_path``.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llmprune_kernels.sparse24 import backends, dispatch
from llmprune_kernels.sparse24.dispatch import BUCKETS, Choice, TuningTable, shape_key
from llmprune_kernels.sparse24.pack import pack_24
from llmprune_kernels.testing import random_24_weight


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
    """Measure every backend that can run this shape for each M bucket on random 2:4 weights and choose
    with ``choose_path`` (close calls re-timed first). Each backend's measured config is kept in the Choice."""
    device = torch.device(device)
    dense = [random_24_weight(out_features, in_features, dtype, device)]
    packed = [pack_24(dense[0])]
    for _ in range(weight_copies(packed[0].nbytes(), device) - 1):
        dense.append(random_24_weight(out_features, in_features, dtype, device))
        packed.append(pack_24(dense[-1]))
    name = shape_key(out_features, in_features, dtype)
    sparse = [b for b in backends.registered()
              if b.name != "dense" and b.usable(out_features, in_features, dtype, device)]
    states = {}
    for b in sparse:
        try:
            states[b.name] = b.tuning_states(packed)
        except Exception as exc:  # a backend that cannot lay out this weight does not compete
            print(f"sparse24 tuning: {b.name} cannot prepare {name}: {exc}")

    def time_fn(fns, trials: int = 5) -> float:
        return time_ms(fns, reps=reps, trials=trials)

    choices = {}
    for m in buckets:
        x = torch.randn(m, in_features, device=device, dtype=dtype)
        cands = {"dense": [lambda w=w, x=x: F.linear(x, w) for w in dense]}
        times, configs = {}, {}
        for b in sparse:
            lo, hi = b.tuned_m_range()
            if b.name not in states or not lo <= m <= hi:
                continue
            try:
                configs[b.name], t, cands[b.name] = b.tune(states[b.name], x, out_features, time_fn)
                if t is not None:
                    times[b.name] = t
            except Exception as exc:  # a path that cannot run this shape and M simply does not compete
                print(f"sparse24 tuning: {b.name} failed for {name} M={m}: {exc}")
        for path, fns in cands.items():
            if path in times:
                continue
            try:
                times[path] = time_ms(fns, reps=reps)
            except Exception as exc:
                times[path] = float("inf")
                print(f"sparse24 tuning: {path} failed for {name} M={m}: {exc}")
        close = dispatch.close_call(times)
        if close is not None:  # re-measure dense and the contender alternately, without selection bias
            times.update(_retime({"dense": cands["dense"], close: cands[close]}, reps))
        choices[m] = Choice(dispatch.choose_path(times), times, configs)
    return choices


def tune(shapes, table: TuningTable | None = None, device="cuda", buckets=BUCKETS) -> TuningTable:
    """Tune every ``(out, in, dtype)`` in ``shapes`` not yet in ``table`` (default: the process table)."""
    table = dispatch.DEFAULT_TABLE if table is None else table
    table.device_name = torch.cuda.get_device_name(torch.device(device))
    for out_features, in_features, dtype in shapes:
        key = shape_key(out_features, in_features, dtype)
        if key not in table.entries:
            table.entries[key] = tune_shape(out_features, in_features, dtype, device, buckets)
            dispatch.bump_epoch()
    return table
