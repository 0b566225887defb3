"""8-bit 2:4 weights (``SparseLinear8``: FP8 e4m3 / INT8 values, per-channel scales) against dense fp16/bf16
``F.linear`` and against 16-bit 2:4 (``SparseLinear`` as ``sparsify_`` dispatches it), timed in the same run.

Cases: LLaMA-7B Linear shapes (out x in: 4096x4096, 11008x4096, 4096x11008), fp16 and bf16 activations,
M = 1, 2, 4, 8, 16 (the 8-bit decode kernel) and M = 64, 2048 (the 8-bit module's fallback: the 16-bit 2:4
dispatch on the dequantised weight). Weights are random, pruned 2:4 by magnitude; the 8-bit ones quantise them.
Per case, in CUDA graphs (the GPU's time, as a decode loop or a compiled model runs kernels):

* ``dense``: ``F.linear(x, W)``, the baseline;
* ``fp16_24``: the 16-bit 2:4 ``SparseLinear`` modules of ``sparsify_`` (tuned for these M; where dense measured
  faster they run dense); ``paths`` names what each module chose;
* ``fp8_24`` / ``int8_24``: the 8-bit modules of ``sparsify_(model, SemiSparseWeightConfig(weight_dtype=...))``
  (FP8 only on GPUs of compute capability 8.9+; ``QUICK``: one of them).

Each is timed ``cold`` (the calls cycle through weight copies holding more than twice the L2 cache, so every
weight comes from HBM, as in a model whose layers run in turn) and ``hot`` (one weight replayed: resident in
L2 where it fits, see ``weight_bytes`` and ``l2_bytes``); plus eager cold figures (Python dispatch and launches
included). ``ratios``: ``<x>_vs_dense_<cache>_<mode>`` = dense time / x time and ``<q8>_vs_fp16_24_...`` =
16-bit 2:4 time / 8-bit time, each in the same cache state and mode; ``gbps``: weight bytes read per second of
the cold graph figures (H100 HBM3: ~3.35 TB/s). The 8-bit byte floor is 0.3125 of dense fp16 (3.2x). Each
8-bit output is compared with the fp32 reference (dequantise, then matmul). Results: ``results/sparse24_8bit.json``.

``test_linear_8bit_act``: the 8-bit x 8-bit path (backend ``cslt8``: cuSPARSELt on the 8-bit weight, activations
quantised per token) at M = 64, 256, 2048, 8192 (the three shapes in fp16, 4096x4096 in bf16), pinned
(``force_path``) on the modules of ``sparsify_(..., SemiSparseWeightConfig(weight_dtype=..., activations="8bit"))``,
against ``dense`` and ``fp16_24`` in the same run, cold and hot, graph and eager, named ``<fp8|int8>_a8``; ``paths``
also names what the opted-in module's dispatch chose for that M (cslt8 where its tuning measured it faster than
the 16-bit fallback). Its outputs are compared with the fp32 reference with fake-quantised activations.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import (HAS_CUDA, QUICK, Results, cold_copies, l2_bytes, ratio, replayer, requires_cuda, synced,
                      time_interleaved, try_run)
from llmprune_kernels import SemiSparseWeightConfig, pack_24, sparsify_
from llmprune_kernels.reference.sparse24_8bit import sparse24_8bit_act_linear_reference, sparse24_8bit_linear_reference
from llmprune_kernels.sparse24.dispatch import TuningTable
from llmprune_kernels.testing import random_24_weight

pytestmark = requires_cuda

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
DTYPES = [torch.float16, torch.bfloat16]
MS = [1, 4, 16, 2048] if QUICK else [1, 2, 4, 8, 16, 64, 2048]
TRIALS = 5 if QUICK else 7
CASES = [(s, d, m) for s in SHAPES for d in DTYPES for m in MS]
ACT_MS = [256, 8192] if QUICK else [64, 256, 2048, 8192]
ACT_CASES = ([(s, torch.float16, m) for s in (SHAPES[:1] if QUICK else SHAPES) for m in ACT_MS]
             + ([] if QUICK else [(SHAPES[0], torch.bfloat16, m) for m in ACT_MS]))
_SETUP: dict = {}


def _weight_dtypes() -> list[str]:
    fp8 = HAS_CUDA and torch.cuda.get_device_capability() >= (8, 9)
    both = (["fp8"] if fp8 else []) + ["int8"]
    return both[:1] if QUICK else both


@pytest.fixture(scope="module")
def results(env):
    res = Results("sparse24_8bit", __doc__, env)
    res.set("weight_dtypes", _weight_dtypes() if HAS_CUDA else [])
    res.set("setup", {})
    return res


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dense_linears(shape, dtype) -> tuple[int, list[torch.Tensor], list[nn.Linear]]:
    """Cold copies of a random 2:4 weight (seed 0) and an ``nn.Linear`` on each; earlier cases' weights freed first
    (one shape's weights at a time). The copies' 8-bit 2:4 bytes (2.5 per 4 weights) exceed twice the L2."""
    _SETUP.clear()
    torch.cuda.empty_cache()
    out_f, in_f = shape
    torch.manual_seed(0)
    n = cold_copies(out_f * in_f * 5 // 8)
    dense = [random_24_weight(out_f, in_f, dtype, "cuda") for _ in range(n)]
    lins = []
    for w in dense:
        lin = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=dtype)
        lin.weight.data = w
        lins.append(lin)
    return n, dense, lins


def _setup(shape, dtype, results):
    """Dense weights (cold copies), the 16-bit 2:4 modules and the 8-bit ones (sparsify_, tuned for MS)."""
    key = (shape, dtype)
    if key in _SETUP:
        return _SETUP[key]
    out_f, in_f = shape
    n, dense, lins = _dense_linears(shape, dtype)
    t0 = time.perf_counter()
    mods = {"fp16_24": list(sparsify_(nn.Sequential(*lins), buckets=tuple(MS)))}  # lins stay nn.Linear
    times = {"fp16_24": time.perf_counter() - t0}
    for wd in _weight_dtypes():
        t0 = time.perf_counter()
        mods[f"{wd}_24"] = list(sparsify_(nn.Sequential(*lins), SemiSparseWeightConfig(weight_dtype=wd),
                                          buckets=tuple(MS)))
        times[f"{wd}_24"] = time.perf_counter() - t0
    setup = results.data["setup"]
    setup[f"{out_f}x{in_f} {_name(dtype)}"] = {"weight_copies": n, "sparsify_s": times}
    results.set("setup", setup)
    _SETUP[key] = (dense, mods, n)
    return _SETUP[key]


def _time_all(x, dense, mods, n, errors) -> dict:
    """Seconds per call of dense ``F.linear`` and of each module set in ``mods``: CUDA graphs over the ``n`` weight
    copies (cold) and over the first (hot), then eager over all copies (cold), interleaved per group."""
    runs = {}
    for cache, idx in (("cold", range(n)), ("hot", [0])):
        runs[f"dense_{cache}_graph"] = replayer([lambda w=dense[i]: F.linear(x, w) for i in idx])
        for name, ms in mods.items():
            runs[f"{name}_{cache}_graph"] = try_run([lambda s=ms[i]: s(x) for i in idx], errors=errors,
                                                    name=f"{name}_{cache}_graph")
    t = time_interleaved(runs, TRIALS)
    eager = {"dense_cold_eager": replayer([lambda w=w: F.linear(x, w) for w in dense], graph=False)}
    for name, ms in mods.items():
        eager[f"{name}_cold_eager"] = try_run([lambda s=s: s(x) for s in ms], graph=False, errors=errors,
                                              name=f"{name}_cold_eager")
    t.update(time_interleaved(eager, TRIALS))
    return t


def _ratios(t: dict) -> dict:
    """``<x>_vs_dense_<cache>_<mode>`` (and ``<x>_vs_fp16_24_...`` for the 8-bit paths) from ``_time_all``'s times."""
    ratios = {}
    for k, v in t.items():
        name, cache, mode = k.rsplit("_", 2)
        if v is None or name == "dense":
            continue
        ratios[f"{name}_vs_dense_{cache}_{mode}"] = ratio(t.get(f"dense_{cache}_{mode}"), v)
        if name != "fp16_24":
            ratios[f"{name}_vs_fp16_24_{cache}_{mode}"] = ratio(t.get(f"fp16_24_{cache}_{mode}"), v)
    return ratios


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1))


@pytest.mark.parametrize("shape,dtype,m", CASES, ids=[f"{s[0]}x{s[1]}-{_name(d)}-M{m}" for s, d, m in CASES])
def test_linear_8bit(benchmark, results, shape, dtype, m):
    with torch.no_grad():
        _case(benchmark, results, shape, dtype, m)


def _case(benchmark, results, shape, dtype, m):
    dense, mods, n = _setup(shape, dtype, results)
    x = torch.randn(m, shape[1], device="cuda", dtype=dtype)
    errors, max_err, paths = {}, {}, {}
    for name, ms in mods.items():
        paths[name] = ms[0].choose(m).path
        y = ms[0](x)
        ref = (sparse24_8bit_linear_reference(x, ms[0].quantized()) if name != "fp16_24"
               else F.linear(x.float(), dense[0].float()))
        max_err[name] = _rel_err(y, ref)
    t = _time_all(x, dense, mods, n, errors)
    ratios = _ratios(t)
    dense_bytes = shape[0] * shape[1] * dense[0].element_size()
    weight_bytes = {"dense": dense_bytes, "fp16_24": pack_24(dense[0]).nbytes()}
    weight_bytes.update({name: ms[0].quantized().nbytes() for name, ms in mods.items() if name != "fp16_24"})
    gbps = {name: (weight_bytes[name] / (t[f"{name}_cold_graph"] * 1e-3) / 1e9 if t.get(f"{name}_cold_graph") else None)
            for name in weight_bytes}
    fig = {
        "case": f"{shape[0]}x{shape[1]} {_name(dtype)} M={m}", "shape": list(shape), "dtype": _name(dtype), "m": m,
        "paths": paths, "weight_copies": n, "weight_bytes": weight_bytes, "l2_bytes": l2_bytes(), "times_ms": t,
        "baseline": "dense fp16/bf16 F.linear (and 16-bit 2:4 SparseLinear for the 8-bit figures), same cache state "
                    "and mode", "ratios": ratios, "gbps": gbps, "max_rel_err": max_err, "errors": errors,
    }
    results.add(fig)
    benchmark.extra_info.update(fig)
    q8 = [ms for name, ms in mods.items() if name != "fp16_24"][0]
    benchmark.pedantic(synced(lambda: [s(x) for s in q8]), rounds=3, iterations=1, warmup_rounds=1)
    for name, err in max_err.items():
        assert err < 5e-2, f"{name} result off by {err:.3g}"


def _setup_act(shape, dtype, results):
    """Dense weights, 16-bit 2:4 modules and 8-bit modules with 8-bit activations opted in, tuned for ACT_MS in a
    table of their own (so the buckets 256 and 8192 are measured whatever ran before)."""
    key = ("act", shape, dtype)
    if key in _SETUP:
        return _SETUP[key]
    out_f, in_f = shape
    n, dense, lins = _dense_linears(shape, dtype)
    table = TuningTable()
    t0 = time.perf_counter()
    mods = {"fp16_24": list(sparsify_(nn.Sequential(*lins), table=table, buckets=tuple(ACT_MS)))}
    times = {"fp16_24": time.perf_counter() - t0}
    for wd in _weight_dtypes():
        t0 = time.perf_counter()
        cfg = SemiSparseWeightConfig(weight_dtype=wd, activations="8bit")
        mods[f"{wd}_a8"] = list(sparsify_(nn.Sequential(*lins), cfg, table=table, buckets=tuple(ACT_MS)))
        times[f"{wd}_a8"] = time.perf_counter() - t0
    setup = results.data["setup"]
    setup[f"a8 {out_f}x{in_f} {_name(dtype)}"] = {"weight_copies": n, "sparsify_s": times}
    results.set("setup", setup)
    _SETUP[key] = (dense, mods, n)
    return _SETUP[key]


@pytest.mark.parametrize("shape,dtype,m", ACT_CASES, ids=[f"{s[0]}x{s[1]}-{_name(d)}-M{m}" for s, d, m in ACT_CASES])
def test_linear_8bit_act(benchmark, results, shape, dtype, m):
    with torch.no_grad():
        _case_act(benchmark, results, shape, dtype, m)


def _case_act(benchmark, results, shape, dtype, m):
    dense, mods, n = _setup_act(shape, dtype, results)
    x = torch.randn(m, shape[1], device="cuda", dtype=dtype)
    errors, max_err, paths = {}, {}, {}
    for name, ms in mods.items():
        paths[name] = ms[0].choose(m).path  # the dispatch's own choice, before pinning
        if name != "fp16_24":
            for s in ms:
                s.force_path = "cslt8"
        y = ms[0](x)
        ref = (F.linear(x.float(), dense[0].float()) if name == "fp16_24"
               else sparse24_8bit_act_linear_reference(x, ms[0].quantized()))
        max_err[name] = _rel_err(y, ref)
    t = _time_all(x, dense, mods, n, errors)
    for name, ms in mods.items():
        for s in ms:
            s.force_path = None
    ratios = _ratios(t)
    flops = 2 * m * shape[0] * shape[1]
    tflops = {k.removesuffix("_cold_graph"): flops / (v * 1e-3) / 1e12 for k, v in t.items()
              if k.endswith("_cold_graph") and v}
    fig = {
        "case": f"a8 {shape[0]}x{shape[1]} {_name(dtype)} M={m}", "shape": list(shape), "dtype": _name(dtype), "m": m,
        "activations": "8bit", "paths": paths, "weight_copies": n, "l2_bytes": l2_bytes(), "times_ms": t,
        "baseline": "dense fp16/bf16 F.linear and 16-bit 2:4 SparseLinear, same cache state and mode",
        "ratios": ratios, "tflops_dense_equivalent": tflops, "max_rel_err": max_err, "errors": errors,
    }
    results.add(fig)
    benchmark.extra_info.update(fig)
    benchmark.pedantic(synced(lambda: F.linear(x, dense[0])), rounds=3, iterations=1, warmup_rounds=1)
    for name, err in max_err.items():
        assert err < 5e-2, f"{name} result off by {err:.3g}"


def test_summary(results):
    """Range over shapes of each 8-bit format's cold-graph speedup over dense and over 16-bit 2:4, per dtype and M."""
    rows: dict = {}
    for f in results.data["figures"]:
        for k, v in f["ratios"].items():
            if k.endswith("_cold_graph") and not k.startswith("fp16_24") and v is not None:
                rows.setdefault(f"{k.removesuffix('_cold_graph')} {f['dtype']} M={f['m']}", []).append(v)
    if not rows:
        pytest.skip("no figures in this run")
    results.set("summary_cold_graph", {k: {"min": min(v), "max": max(v), "cases": len(v)} for k, v in rows.items()})
