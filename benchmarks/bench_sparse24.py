"""2:4 inference: ``SparseLinear`` per backend and as dispatched, against dense ``F.linear`` on the same
weights, timed in the same run.

Cases: LLaMA-7B Linear shapes (out x in: 4096x4096 q/k/v/o, 11008x4096 gate/up, 4096x11008 down), fp16 and
bf16, M = 1, 4, 16, 64, 256, 2048, 8192 rows of input. Weights are random and pruned 2:4 by magnitude.
Per case, in CUDA graphs (the GPU's time; a decode loop or a compiled model runs kernels so):
* ``dense``: ``F.linear(x, W)``, the baseline;
* ``dispatched``: the ``SparseLinear`` modules of ``sparsify_`` (each shape tuned once for these M values;
  a sparse path runs only where it measured faster than dense, so where dense wins this is dense against
  dense); ``dispatched_path`` names what it chose;
* ``force_path`` = each registered 2:4 backend that ``backends()`` reports usable, alone, with the
  configuration the module resolves: ``decode`` (our Triton kernel, M <= 64), ``mmasp`` (our mma.sp CUDA
  kernel, M <= 16), ``cusparselt`` (cuSPARSELt with cached plans, every M), ``cutlass`` (CUTLASS's sm90
  sparse GEMM, M >= 64): each over the M range where tuning measures it.
Each of these is timed twice: ``cold`` (the calls cycle through copies of the weight holding more than twice
the L2 cache, so weights come from HBM as in a model whose layers run in turn) and ``hot`` (one weight,
called repeatedly: resident in L2 where it fits, see ``weight_bytes`` and ``l2_bytes``). Eager figures
(Python dispatch and launches included, cold): ``F.linear``, the dispatched modules, an ``nn.Linear`` module
call (the drop-in baseline) and torch's ``to_sparse_semi_structured`` + ``F.linear`` (one weight). All
timings are medians of interleaved trials; ``speedup_<x>`` = dense time / x time in the same cache state and
mode. Every path's output is compared with the fp32 dense product. Results: ``results/sparse24.json``.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import (HAS_CUDA, QUICK, Results, cold_copies, l2_bytes, ratio, replayer, requires_cuda, synced,
                      time_interleaved, try_run)
from llmprune_kernels import SparseLinear, backends, pack_24, sparsify_
from llmprune_kernels.sparse24 import backends as sparse24_backends
from llmprune_kernels.testing import random_24_weight

pytestmark = requires_cuda

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
DTYPES = [torch.float16, torch.bfloat16]
MS = [1, 16, 2048] if QUICK else [1, 4, 16, 64, 256, 2048, 8192]
TRIALS = 5 if QUICK else 7
CASES = [(s, d, m) for s in SHAPES for d in DTYPES for m in MS]
ENGINES = ("cpp", "cuda", "triton")  # backends()'s compute engines; its other keys are the 2:4 backends


_SETUP: dict = {}


def _paths() -> list[str]:
    """The registered 2:4 backends usable on this GPU (dense is the baseline, ``F.linear``); those that run 8-bit
    weights only are measured by bench_sparse24_8bit.py."""
    return [name for name, ok in backends().items() if ok and name not in ENGINES and name != "dense"
            and not sparse24_backends.get(name).quantized]


@pytest.fixture(scope="module")
def results(env):
    res = Results("sparse24", __doc__, env)
    res.set("paths", _paths() if HAS_CUDA else [])
    res.set("setup", {})
    return res


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _setup(shape, dtype, results):
    """Weights (cold copies), dense Linears, the dispatched modules (sparsify_) and the per-path modules."""
    key = (shape, dtype)
    if key in _SETUP:
        return _SETUP[key]
    _SETUP.clear()  # one shape's weights at a time
    torch.cuda.empty_cache()
    out_f, in_f = shape
    torch.manual_seed(0)
    dense = [random_24_weight(out_f, in_f, dtype, "cuda")]
    n = cold_copies(pack_24(dense[0]).nbytes())  # the sparse bytes exceed 2x L2, the dense ones all the more
    dense += [random_24_weight(out_f, in_f, dtype, "cuda") for _ in range(n - 1)]
    lins = []
    for w in dense:
        lin = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=dtype)
        lin.weight.data = w
        lins.append(lin)
    t0 = time.perf_counter()
    model = sparsify_(nn.Sequential(*lins), buckets=tuple(MS))  # tunes this shape (lins stay nn.Linear)
    tune_s = time.perf_counter() - t0
    dispatched = list(model)
    forced = [SparseLinear.from_linear(lin) for lin in lins]
    try:
        from torch.sparse import to_sparse_semi_structured

        torch_sparse = to_sparse_semi_structured(dense[0])
    except Exception as exc:  # noqa: BLE001 - recorded: torch's own path cannot run this case
        torch_sparse = f"{type(exc).__name__}: {exc}"[:300]
    setup = results.data["setup"]
    setup[f"{out_f}x{in_f} {_dtype_name(dtype)}"] = {"weight_copies": n, "sparsify_s": tune_s}
    results.set("setup", setup)
    _SETUP[key] = (dense, lins, dispatched, forced, torch_sparse, n)
    return _SETUP[key]


def _choice(mod, m: int) -> dict | None:
    """Informational: the backend and launch config a module resolves for this M (None if it cannot say)."""
    try:
        c = mod.choose(m).to_json()
        return {"path": c["path"], "config": c.get("labels", {}).get(c["path"]) or c.get("configs", {}).get(c["path"])}
    except Exception:  # noqa: BLE001
        return None


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1))


@pytest.mark.parametrize("shape,dtype,m", CASES,
                         ids=[f"{s[0]}x{s[1]}-{_dtype_name(d)}-M{m}" for s, d, m in CASES])
def test_linear(benchmark, results, shape, dtype, m):
    with torch.no_grad():
        _linear_case(benchmark, results, shape, dtype, m)


def _linear_case(benchmark, results, shape, dtype, m):
    dense, lins, dispatched, forced, torch_sparse, n = _setup(shape, dtype, results)
    x = torch.randn(m, shape[1], device="cuda", dtype=dtype)
    ref = F.linear(x.float(), dense[0].float())
    errors: dict = {}
    max_err = {"dispatched": _rel_err(dispatched[0](x), ref)}
    choices = {"dispatched": _choice(dispatched[0], m)}
    runs = {}
    for cache, idx in (("cold", range(n)), ("hot", [0])):
        runs[f"dense_{cache}"] = replayer([lambda w=dense[i]: F.linear(x, w) for i in idx])
        runs[f"dispatched_{cache}"] = try_run([lambda s=dispatched[i]: s(x) for i in idx], errors=errors,
                                              name=f"dispatched_{cache}")
    for path in _paths():
        lo, hi = sparse24_backends.get(path).tuned_m_range()  # outside it a pinned backend is slow or runs dense
        if not lo <= m <= hi:
            continue
        try:
            for mod in forced:
                mod.force_path = path
                mod.prepare()
            max_err[path] = _rel_err(forced[0](x), ref)
            choices[path] = _choice(forced[0], m)
        except Exception as exc:  # noqa: BLE001 - this backend cannot run the case: recorded
            errors[path] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        for cache, idx in (("cold", range(n)), ("hot", [0])):
            runs[f"{path}_{cache}"] = try_run([lambda s=forced[i]: s(x) for i in idx], errors=errors,
                                              name=f"{path}_{cache}")
    t = {f"{k}_graph": v for k, v in time_interleaved(runs, TRIALS).items()}
    eager = {
        "dense_cold_eager": replayer([lambda w=w: F.linear(x, w) for w in dense], graph=False),
        "dispatched_cold_eager": try_run([lambda s=s: s(x) for s in dispatched], graph=False, errors=errors,
                                         name="dispatched_cold_eager"),
        "nn_linear_cold_eager": replayer([lambda lin=lin: lin(x) for lin in lins], graph=False),
    }
    if not isinstance(torch_sparse, str):
        eager["torch_semi_structured_hot_eager"] = try_run([lambda: F.linear(x, torch_sparse)], graph=False,
                                                           errors=errors, name="torch_semi_structured_hot_eager")
        eager["dense_hot_eager"] = replayer([lambda: F.linear(x, dense[0])], graph=False)
    else:
        errors["torch_semi_structured"] = torch_sparse
    t.update(time_interleaved(eager, TRIALS))
    speedups = {}
    for k, v in t.items():
        if v is None or k.startswith("dense_"):
            continue
        name, cache, mode = k.rsplit("_", 2)
        if name == "nn_linear":  # the drop-in comparison: an nn.Linear module call against the dispatched one
            continue
        speedups[f"speedup_{name}_{cache}_{mode}"] = ratio(t.get(f"dense_{cache}_{mode}"), v)
    speedups["speedup_dispatched_cold_eager_vs_nn_linear"] = ratio(t.get("nn_linear_cold_eager"),
                                                                   t.get("dispatched_cold_eager"))
    fig = {
        "case": f"{shape[0]}x{shape[1]} {_dtype_name(dtype)} M={m}", "shape": list(shape),
        "dtype": _dtype_name(dtype), "m": m, "dispatched_path": (choices["dispatched"] or {}).get("path"),
        "choices": choices, "weight_copies": n,
        "weight_bytes_dense": shape[0] * shape[1] * dense[0].element_size(),
        "weight_bytes_packed": pack_24(dense[0]).nbytes(), "l2_bytes": l2_bytes(), "times_ms": t,
        "baseline": "dense (F.linear, same cache state and mode)", "ratios": speedups, "max_rel_err": max_err,
        "errors": errors,
    }
    results.add(fig)
    benchmark.extra_info.update(fig)
    benchmark.pedantic(synced(lambda: [s(x) for s in dispatched]), rounds=5, iterations=1, warmup_rounds=1)
    assert max_err["dispatched"] < 5e-2, f"dispatched result off by {max_err['dispatched']:.3g}"


def test_summary(results):
    """Range over shapes of the dispatched cold-graph speedup per dtype and M."""
    rows: dict = {}
    for f in results.data["figures"]:
        s = f["ratios"].get("speedup_dispatched_cold_graph")
        if s is not None:
            rows.setdefault(f"{f['dtype']} M={f['m']}", []).append(s)
    if not rows:
        pytest.skip("no figures in this run")
    results.set("summary_dispatched_cold_graph", {k: {"min": min(v), "max": max(v), "cases": len(v)}
                                                  for k, v in rows.items()})
