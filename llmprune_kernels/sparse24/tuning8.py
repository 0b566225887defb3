"""Tuning of 8-bit modules' paths, kept in the dispatch table beside the 16-bit choices:

* decode (M <= 16, ``tune_q8``): the 8-bit decode backends (``decode8``, ``mmasp8``) per weight shape, compute
  dtype and 8-bit type, each with its measured config, timed interleaved in CUDA graphs over weight copies
  (every weight read from HBM, as in a model's decode step); the fastest runs (key ``dispatch.q8_key``).
* 8-bit activations (M > 16, ``tune_act8``): ``cslt8`` against the 16-bit 2:4 fallback of an 8-bit module, per
  weight shape, 8-bit type and M bucket above 16.

For each bucket the fallback is what the 16-bit table (or the defaults) runs for the module's (out, in,
compute dtype), exactly as :class:`~llmprune_kernels.sparse24.linear8.SparseLinear8` would run it. cslt8 measures
its algorithm ids first (``Backend.tune``), then cslt8 and the fallback are timed interleaved (CUDA graphs over
weight copies: every weight read from HBM) and cslt8 is chosen only where it is ``DISPATCH_MARGIN`` faster. The
choice sits under ``dispatch.act8_key`` in the same :class:`~llmprune_kernels.sparse24.dispatch.TuningTable`
(saved and loaded with it). Modules use it only when their user opted in to 8-bit activations.
"""
from __future__ import annotations

import torch

from llmprune_kernels.sparse24 import backends, dispatch, tuning
from llmprune_kernels.sparse24.dispatch import BUCKETS, Choice, TuningTable, act8_key, q8_key
from llmprune_kernels.sparse24.pack import pack_24
from llmprune_kernels.sparse24.quant8 import quantize_24, weight_dtype_name
from llmprune_kernels.testing import random_24_weight

CSLT8 = "cslt8"
Q8_DECODE = ("decode8", "mmasp8")  # ties go to the first
DECODE_MAX_M = 16


@torch.no_grad()
def tune_shape_q8(out_features: int, in_features: int, dtype: torch.dtype, qdtype: torch.dtype, device="cuda",
                  buckets=BUCKETS, reps: int = 10) -> dict[int, Choice]:
    """``{bucket <= 16: Choice}``: the fastest 8-bit decode backend for per-channel ``qdtype`` weights of this
    shape and ``dtype`` activations, every contender's time and measured config (empty where none can run)."""
    device = torch.device(device)
    contenders = [b for b in map(backends.get, Q8_DECODE)
                  if b.usable(out_features, in_features, qdtype, device) and b.accepts(dtype, None)]
    if not contenders:
        return {}
    name = f"{dispatch.shape_key(out_features, in_features, dtype)} {weight_dtype_name(qdtype)}"
    nbytes = out_features * in_features * 5 // 8
    qs = [quantize_24(random_24_weight(out_features, in_features, dtype, device), qdtype)
          for _ in range(tuning.weight_copies(nbytes, device))]
    states = {}
    for b in contenders:
        try:
            states[b.name] = [b.prepare(q) for q in qs]
        except Exception as exc:  # a backend that cannot lay out this weight does not compete
            print(f"sparse24 tuning: {b.name} cannot prepare {name}: {exc}")

    def time_fn(fns, trials: int = 5) -> float:
        return tuning.time_ms(fns, reps=reps, trials=trials)

    choices = {}
    for m in (b for b in buckets if b <= DECODE_MAX_M):
        x = torch.randn(m, in_features, device=device, dtype=dtype)
        cands, configs = {}, {}
        for b in contenders:
            if b.name not in states or not b.serves(m):
                continue
            try:
                configs[b.name], _, cands[b.name] = b.tune(states[b.name], x, out_features, time_fn)
            except Exception as exc:  # a path that cannot run this shape and M does not compete
                print(f"sparse24 tuning: {b.name} failed for {name} M={m}: {exc}")
        if not cands:
            continue
        times = tuning._retime(cands, reps) if len(cands) > 1 else {p: time_fn(f) for p, f in cands.items()}
        choices[m] = Choice(min(times, key=times.get), times, configs)
    return choices


def tune_q8(specs, table: TuningTable | None = None, device="cuda", buckets=BUCKETS) -> TuningTable:
    """Tune the decode path of every ``(out, in, compute dtype, 8-bit dtype)`` in ``specs`` not yet in ``table``."""
    table = dispatch.DEFAULT_TABLE if table is None else table
    for out_features, in_features, dtype, qdtype in specs:
        key = q8_key(out_features, in_features, dtype, qdtype)
        if key not in table.entries:
            table.entries[key] = tune_shape_q8(out_features, in_features, dtype, qdtype, device, buckets)
            dispatch.bump_epoch()
    return table


@torch.no_grad()
def tune_shape_act8(out_features: int, in_features: int, dtype: torch.dtype, qdtype: torch.dtype,
                    table: TuningTable, device="cuda", buckets=BUCKETS, reps: int = 10) -> dict[int, Choice]:
    """``{bucket: Choice}`` for the buckets above 16: path ``cslt8`` where it measured faster than the fallback,
    else the fallback's name; times of both and cslt8's measured algorithm (empty where cslt8 cannot run)."""
    device = torch.device(device)
    b8 = backends.get(CSLT8)
    if dtype not in (torch.float16, torch.bfloat16) or not b8.usable(out_features, in_features, qdtype, device):
        return {}
    name = f"{dispatch.shape_key(out_features, in_features, dtype)} {weight_dtype_name(qdtype)}"
    nbytes = out_features * in_features * 5 // 8  # 8-bit 2:4: 2.5 bytes per 4 weights
    dense = [random_24_weight(out_features, in_features, dtype, device)
             for _ in range(tuning.weight_copies(nbytes, device))]
    states8 = b8.tuning_states([quantize_24(w, qdtype) for w in dense])
    packed = [pack_24(w) for w in dense]
    fb_states: dict[str, list] = {}

    def time_fn(fns, trials: int = 5) -> float:
        return tuning.time_ms(fns, reps=reps, trials=trials)

    choices = {}
    for m in buckets:
        if not b8.serves(m):
            continue
        fb = table.lookup(out_features, in_features, dtype, m)
        fb = dispatch.default_choice(out_features, in_features, dtype, m, device) if fb is None else fb
        bf = backends.get(fb.path)
        x = torch.randn(m, in_features, device=device, dtype=dtype)
        try:
            cfg, _, fns8 = b8.tune(states8, x, out_features, time_fn)
            if fb.path not in fb_states:
                fb_states[fb.path] = bf.tuning_states(packed)
            fcfg, _ = bf.resolve(fb.config(), out_features, in_features, dtype, m, device, False)
            fns_fb = [lambda s=s, c=fcfg: bf.bind(s, c, m, in_features, out_features, None)(x)
                      for s in fb_states[fb.path]]
            times = tuning._retime({CSLT8: fns8, fb.path: fns_fb}, reps)
        except Exception as exc:  # cslt8 that cannot run this shape and M does not compete
            print(f"sparse24 tuning: cslt8 failed for {name} M={m}: {exc}")
            continue
        faster = times[CSLT8] <= times[fb.path] * (1.0 - dispatch.DISPATCH_MARGIN)
        choices[m] = Choice(CSLT8 if faster else fb.path, times, {CSLT8: cfg})
    return choices


def tune_act8(specs, table: TuningTable | None = None, device="cuda", buckets=BUCKETS) -> TuningTable:
    """Tune every ``(out, in, compute dtype, 8-bit dtype)`` in ``specs`` not yet in ``table`` (default: the
    process table). Run after the 16-bit tuning of the same shapes, whose choices are the fallbacks."""
    table = dispatch.DEFAULT_TABLE if table is None else table
    for out_features, in_features, dtype, qdtype in specs:
        key = act8_key(out_features, in_features, dtype, qdtype)
        if key not in table.entries:
            table.entries[key] = tune_shape_act8(out_features, in_features, dtype, qdtype, table, device, buckets)
            dispatch.bump_epoch()
    return table
