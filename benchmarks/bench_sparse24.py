"""2:4 inference on the GPU: SparseLinear (measured dispatch) vs dense F.linear, same run, same weights.

Per LLaMA-7B shape (out x in), dtype and M: CUDA-graph replay times (the kernels, as a decode loop or
a compiled model runs them) and eager times (plus Python dispatch), each over several weight copies so
small-M calls read their weights from HBM, not L2. Also: torch's own ``to_sparse_semi_structured`` +
``F.linear`` (eager), an ``nn.Linear`` module call on the same weight (``nn_linear_eager``: the eager baseline of a
drop-in swap, module call overhead included), the decode kernel alone (``decode_graph``, M <= 64, with the config the tuner
picked; its kind is recorded as ``decode_kernel``), the mma.sp kernel alone (``mmasp_graph``, M <= 16, with
the tuned config ``mmasp_config``), the CUTLASS sm90 kernel alone (``cutlass_graph``, M >= 64, with the
tuned ``cutlass_config``) and every decode candidate's tuning time
(``decode_candidates``: do_bench medians, L2 flushed). An end-to-end LLaMA-7B-shaped model (random
weights pruned 2:4) is measured by ``benchmarks/e2e_sparse24.py`` (separate processes), which adds its
figures to the same JSON. Writes ``benchmarks/results/sparse24_h100.json`` (or $SPARSE24_RESULTS) and the
tuning table next to it (``sparse24_tuning_h100.json``, or $SPARSE24_TABLE).
Run: ``pytest benchmarks/bench_sparse24.py -s`` (needs a CUDA GPU).
"""
from __future__ import annotations

import datetime
import json
import os
import platform

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("2:4 inference benchmarks need a CUDA GPU", allow_module_level=True)

from llmprune_kernels import backends  # noqa: E402
from llmprune_kernels.sparse24 import SparseLinear  # noqa: E402
from llmprune_kernels.sparse24.backends import decode as s24
from llmprune_kernels.sparse24.backends import mmasp as mm  # noqa: E402
from llmprune_kernels.sparse24.backends import cusparselt as cslt  # noqa: E402
from llmprune_kernels.sparse24.backends import cutlass_sm90 as ctl  # noqa: E402
from llmprune_kernels.sparse24 import dispatch  # noqa: E402
from llmprune_kernels.sparse24.pack import pack_24  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # out x in: q/k/v/o, gate/up, down
# $SPARSE24_MS / $SPARSE24_DTYPES narrow a run, e.g. SPARSE24_MS=1,4,16 SPARSE24_DTYPES=float16
MS = [int(v) for v in os.environ.get("SPARSE24_MS", "1,4,16,64,256,2048,8192").split(",")]
DTYPES = [getattr(torch, v) for v in os.environ.get("SPARSE24_DTYPES", "float16,bfloat16").split(",")]
RESULTS: dict = {"cases": []}
# SPARSE24_TABLE_SEED: a table saved by an earlier run of the same code, so a run cut short by its time
# limit can be completed shape by shape (its shapes are not re-tuned; the e2e step then sees every shape)
TABLE = (dispatch.TuningTable.load(os.environ["SPARSE24_TABLE_SEED"]) if os.environ.get("SPARSE24_TABLE_SEED")
         else dispatch.TuningTable())
_SETUPS: dict = {}


def env_info() -> dict:
    import triton
    import transformers

    return {
        "gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "transformers": transformers.__version__,
        "cusparselt_torch": torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None,
        "backends": backends(), "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _setup(shape, dtype):
    key = (shape, dtype)
    if key not in _SETUPS:
        _SETUPS.clear()  # one shape's weights at a time
        torch.cuda.empty_cache()
        out_f, in_f = shape
        dispatch.tune([(out_f, in_f, dtype)], TABLE, buckets=tuple(MS))
        dense = [random_24_weight(out_f, in_f, dtype, "cuda")]
        n = dispatch.weight_copies(pack_24(dense[0]).nbytes(), "cuda")
        dense += [random_24_weight(out_f, in_f, dtype, "cuda") for _ in range(n - 1)]
        mods, lins = [], []
        for w in dense:
            lin = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=dtype)
            lin.weight.data = w
            lins.append(lin)  # shares w: the drop-in baseline of the eager comparison
            sl = SparseLinear.from_linear(lin)
            sl.table = TABLE
            mods.append(sl.prepare())
        try:
            from torch.sparse import to_sparse_semi_structured

            torch_sparse = to_sparse_semi_structured(dense[0])
        except Exception as exc:  # record why torch's own path cannot run
            torch_sparse = exc
        _SETUPS[key] = (dense, mods, torch_sparse, lins)
    return _SETUPS[key]


def _safe_pair(dense_fns, sparse_fns, *more, **kw):
    try:
        kw.setdefault("trials", 9)
        return tuple(dispatch.time_ms_interleaved([dense_fns, sparse_fns, *more], **kw))
    except Exception as exc:
        print(f"  timing failed: {type(exc).__name__}: {exc}")
        return (None,) * (2 + len(more))


def _safe_time(fns, **kw):
    try:
        return dispatch.time_ms(fns, **kw)
    except Exception as exc:
        print(f"  timing failed: {type(exc).__name__}: {exc}")
        return None


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_linear(benchmark, shape, dtype, m):
    dense, mods, torch_sparse, lins = _setup(shape, dtype)
    x = torch.randn(m, shape[1], device="cuda", dtype=dtype)
    with torch.no_grad():
        dense_fns = [lambda w=w: F.linear(x, w) for w in dense]
        sparse_fns = [lambda s=s: s(x) for s in mods]
        t = {}  # dense and sparse timed in turn within every trial: clock drift cannot favour either
        # large M: a call is compute-bound and power-limited, its clock drifts most; more trials
        t["dense_graph"], t["sparse_graph"] = _safe_pair(dense_fns, sparse_fns, trials=21 if m >= 2048 else 9)
        module_fns = [lambda lin=lin: lin(x) for lin in lins]  # what a user swapping nn.Linear compares
        t["dense_eager"], t["sparse_eager"], t["nn_linear_eager"] = _safe_pair(dense_fns, sparse_fns, module_fns,
                                                                               graph=False)
        choice = mods[0].choose(m)
        if choice.decode is not None:  # the decode kernel alone, as the tuner configured it
            t["decode_graph"] = _safe_time([lambda s=s: s24.sparse24_mm(x, s.values, s.meta, None, shape[1],
                                                                         block=choice.decode) for s in mods])
        if choice.mmasp is not None and m <= mm.MAX_M:  # the mma.sp kernel alone, as the tuner configured it
            t["mmasp_graph"] = _safe_time([lambda s=s: mm.mmasp_linear(x, s._mmasp_layout(), None, choice.mmasp)
                                           for s in mods])
        if choice.cutlass is not None:  # the CUTLASS sm90 kernel alone, with the tuned config
            t["cutlass_graph"] = _safe_time([lambda s=s: ctl.linear(x, s._cutlass_for(choice)[1], shape[0], None,
                                                                    choice.cutlass) for s in mods])
        if isinstance(torch_sparse, Exception):
            t["torch_semi_structured_eager"] = None
            torch_err = f"{type(torch_sparse).__name__}: {torch_sparse}"
        else:
            t["torch_semi_structured_eager"] = _safe_time([lambda: F.linear(x, torch_sparse)], graph=False)
            torch_err = None
        # correctness in the timed configuration
        ref = F.linear(x.float(), dense[0].float())
        err = float((mods[0](x).float() - ref).abs().max() / ref.abs().max().clamp_min(1))

        def run():
            for s in mods:
                s(x)
            torch.cuda.synchronize()

        benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    ratio = lambda a, b: None if (t[a] is None or t[b] is None) else t[a] / t[b]  # noqa: E731
    case = {
        "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "m": m, "path": choice.path,
        "cslt_config": choice.cslt.as_dict() if choice.cslt else None, "times_ms": t,
        "decode_config": list(choice.decode) if choice.decode else None,
        "decode_kernel": s24.config_name(choice.decode) if choice.decode else None,
        "speedup_decode_graph": ratio("dense_graph", "decode_graph") if "decode_graph" in t else None,
        "mmasp_config": list(choice.mmasp) if choice.mmasp else None,
        "speedup_mmasp_graph": ratio("dense_graph", "mmasp_graph") if "mmasp_graph" in t else None,
        "cutlass_config": choice.cutlass,
        "cutlass_config_desc": ctl.describe(choice.cutlass) if choice.cutlass is not None else None,
        "speedup_cutlass_graph": ratio("dense_graph", "cutlass_graph") if "cutlass_graph" in t else None,
        "tuning_times_ms": choice.times_ms, "max_rel_err": err, "torch_semi_structured_error": torch_err,
        "speedup_graph": ratio("dense_graph", "sparse_graph"), "speedup_eager": ratio("dense_eager", "sparse_eager"),
        "speedup_eager_vs_nn_linear": ratio("nn_linear_eager", "sparse_eager"),
        "speedup_torch_semi_structured_eager": ratio("dense_eager", "torch_semi_structured_eager"),
    }
    RESULTS["cases"].append(case)
    _write()  # after every case, so a time-out still leaves the measured part
    benchmark.extra_info.update(case)
    print(f"\n{shape} {case['dtype']} M={m}: path={choice.path} graph {case['speedup_graph']} eager "
          f"{case['speedup_eager']} (vs nn.Linear {case['speedup_eager_vs_nn_linear']}) torch {case['speedup_torch_semi_structured_eager']} decode "
          f"{case['speedup_decode_graph']} ({case['decode_kernel']}) mmasp {case['speedup_mmasp_graph']} "
          f"{case['mmasp_config']} cutlass {case['speedup_cutlass_graph']} ({case['cutlass_config_desc']})")
    assert err < 5e-2


def _write():
    RESULTS["env"] = env_info()
    RESULTS["tuning_table"] = {k: {str(b): c.to_json() for b, c in v.items()} for k, v in TABLE.entries.items()}
    cands: dict = {}
    for (n, k, dtype, m), times in s24.TUNE_TIMES.items():
        per = cands.setdefault(dispatch.shape_key(n, k, dtype), {})
        per[str(m)] = {s24.config_name(c): t for c, t in sorted(times.items(), key=lambda kv: kv[1])}
    RESULTS["decode_candidates"] = cands
    RESULTS["decode_candidate_errors"] = {f"{dispatch.shape_key(n, k, dt)} M={m} {s24.config_name(c)}": e
                                          for (n, k, dt, m, c), e in s24.TUNE_ERRORS.items()}
    RESULTS["method"] = ("times are medians of CUDA-event timings; *_graph: one CUDA graph replaying the call "
                         "over several weight copies (> 2x L2 bytes); *_eager: the same loop in eager mode; dense and sparse "
                         "replayed in turn within each of 9 trials (21 for the graphs at M >= 2048; medians), so drift weighs on both "
                         "alike; speedup = dense time / sparse time; decode_graph: the decode kernel alone with the "
                         "tuned config; decode_candidates: triton do_bench medians (ms, L2 flushed, one weight) "
                         "of every decode config per shape and M; a sparse path is chosen only if >= "
                         f"{dispatch.DISPATCH_MARGIN:.0%} faster than dense in tuning (close calls re-timed)")
    path = os.environ.get("SPARSE24_RESULTS", os.path.join(os.path.dirname(__file__), "results", "sparse24_h100.json"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(RESULTS, f, indent=1)
    TABLE.save(os.environ.get("SPARSE24_TABLE", os.path.join(os.path.dirname(path), "sparse24_tuning_h100.json")))


def test_write_results():
    _write()
    assert RESULTS["cases"]
