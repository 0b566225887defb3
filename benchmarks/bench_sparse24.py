"""2:4 inference on the GPU: SparseLinear (measured dispatch) vs dense F.linear, same run, same weights.

Per LLaMA-7B shape (out x in), dtype and M: CUDA-graph replay times (the kernels, as a decode loop or
a compiled model runs them) and eager times (plus Python dispatch), each over several weight copies so
small-M calls read their weights from HBM, not L2. Also: torch's own ``to_sparse_semi_structured`` +
``F.linear`` (eager), each of our paths alone, and an end-to-end LLaMA-7B-shaped model (random weights
pruned 2:4): prefill time and greedy decode tokens/s, sparse vs dense.
Writes ``benchmarks/results/sparse24_h100.json`` (or $SPARSE24_RESULTS).
Run: ``pytest benchmarks/bench_sparse24.py -s`` (needs a CUDA GPU).
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("2:4 inference benchmarks need a CUDA GPU", allow_module_level=True)

from llmprune_kernels import backends  # noqa: E402
from llmprune_kernels.nn import SparseLinear, sparsify_  # noqa: E402
from llmprune_kernels.sparse24 import cusparselt as cslt  # noqa: E402
from llmprune_kernels.sparse24 import dispatch  # noqa: E402
from llmprune_kernels.sparse24.pack import pack_24  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # out x in: q/k/v/o, gate/up, down
MS = [1, 4, 16, 64, 256, 2048, 8192]
DTYPES = [torch.float16, torch.bfloat16]
RESULTS: dict = {"cases": [], "e2e": None}
TABLE = dispatch.TuningTable()
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
        dense = [dispatch.random_24_weight(out_f, in_f, dtype, "cuda")]
        n = dispatch.weight_copies(pack_24(dense[0]).nbytes(), "cuda")
        dense += [dispatch.random_24_weight(out_f, in_f, dtype, "cuda") for _ in range(n - 1)]
        mods = []
        for w in dense:
            lin = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=dtype)
            lin.weight.data = w
            sl = SparseLinear.from_linear(lin)
            sl.table = TABLE
            mods.append(sl.prepare())
        try:
            from torch.sparse import to_sparse_semi_structured

            torch_sparse = to_sparse_semi_structured(dense[0])
        except Exception as exc:  # record why torch's own path cannot run
            torch_sparse = exc
        _SETUPS[key] = (dense, mods, torch_sparse)
    return _SETUPS[key]


def _safe_time(fns, **kw):
    try:
        return dispatch.time_ms(fns, **kw)
    except Exception as exc:
        print(f"  timing failed: {type(exc).__name__}: {exc}")
        return None


# ------------------------------------------------------------------------------------------ end to end
def _prune_24_(w: torch.Tensor) -> None:
    """Magnitude 2:4 in place (the 2 smallest |w| of each group of 4), on the GPU."""
    g = w.view(-1, 4)
    idx = g.abs().argsort(dim=1)[:, :2]
    g.scatter_(1, idx, 0)


def _decode_graph(model, cfg, prompt, n_new):
    """Greedy decode with a static KV cache and one CUDA graph per step; returns (tokens, s/token)."""
    from transformers import StaticCache

    p = prompt.shape[1]
    cache = StaticCache(config=cfg, max_cache_len=p + n_new + 1)
    with torch.no_grad():
        logits = model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(p, device="cuda"),
                       use_cache=True).logits
        tok = logits[:, -1:].argmax(-1)
        pos = torch.tensor([p], device="cuda")

        def step():
            out = model(input_ids=tok, past_key_values=cache, cache_position=pos, position_ids=pos[None],
                        use_cache=True).logits
            return out[:, -1:].argmax(-1)

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step()  # warm-up writes positions p, p (overwritten below)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            nxt = step()
        tokens = [int(tok)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n_new):
            g.replay()
            tok.copy_(nxt)
            pos.add_(1)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / n_new
    return dt


def test_e2e_llama7b_shaped(benchmark):
    from transformers import LlamaConfig, LlamaForCausalLM

    layers = int(os.environ.get("SPARSE24_E2E_LAYERS", "8"))
    dtype = torch.float16
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device("cuda"):
        dense = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(prev)
    with torch.no_grad():
        for name, mod in dense.model.layers.named_modules():
            if isinstance(mod, nn.Linear):
                _prune_24_(mod.weight.data)
    sparse = copy.deepcopy(dense)
    t0 = time.perf_counter()
    sparsify_(sparse, table=TABLE)  # shapes already tuned by test_linear when run in the same session
    sparsify_s = time.perf_counter() - t0
    res = {"layers": layers, "dtype": "float16", "hidden": 4096, "intermediate": 11008, "sparsify_s": sparsify_s,
           "n_sparse_linears": sum(isinstance(m, SparseLinear) for m in sparse.modules())}
    prompt = torch.randint(0, 32000, (1, 2048), device="cuda")
    with torch.no_grad():
        for name, model in (("dense", dense), ("sparse", sparse)):
            res[f"prefill_2048_ms_{name}"] = dispatch.time_ms([lambda m=model: m(prompt, logits_to_keep=1)],
                                                              graph=False, reps=3, trials=3)
            short = prompt[:, :128]
            model.generate(short, max_new_tokens=4, do_sample=False)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(short, max_new_tokens=64, min_new_tokens=64, do_sample=False)
            torch.cuda.synchronize()
            res[f"decode_eager_tok_s_{name}"] = 64 / (time.perf_counter() - t0)
            res[f"tokens_{name}"] = out[0, 128:].tolist()
            try:
                res[f"decode_graph_tok_s_{name}"] = 1.0 / _decode_graph(model, cfg, short, 64)
            except Exception as exc:
                res[f"decode_graph_tok_s_{name}"] = None
                res[f"decode_graph_error_{name}"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    res["prefill_speedup"] = res["prefill_2048_ms_dense"] / res["prefill_2048_ms_sparse"]
    res["decode_eager_speedup"] = res["decode_eager_tok_s_sparse"] / res["decode_eager_tok_s_dense"]
    if res.get("decode_graph_tok_s_sparse") and res.get("decode_graph_tok_s_dense"):
        res["decode_graph_speedup"] = res["decode_graph_tok_s_sparse"] / res["decode_graph_tok_s_dense"]
    res["greedy_tokens_agree"] = sum(a == b for a, b in zip(res.pop("tokens_dense"), res.pop("tokens_sparse"))) / 64
    RESULTS["e2e"] = res
    _write()
    benchmark.extra_info.update(res)
    benchmark.pedantic(lambda: (sparse(prompt[:, :256], logits_to_keep=1), torch.cuda.synchronize()), rounds=3)
    print("\n", json.dumps(res, indent=1))
    assert res["n_sparse_linears"] == 7 * layers


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_linear(benchmark, shape, dtype, m):
    dense, mods, torch_sparse = _setup(shape, dtype)
    x = torch.randn(m, shape[1], device="cuda", dtype=dtype)
    with torch.no_grad():
        dense_fns = [lambda w=w: F.linear(x, w) for w in dense]
        sparse_fns = [lambda s=s: s(x) for s in mods]
        t = {
            "dense_graph": _safe_time(dense_fns), "sparse_graph": _safe_time(sparse_fns),
            "dense_eager": _safe_time(dense_fns, graph=False), "sparse_eager": _safe_time(sparse_fns, graph=False),
        }
        if isinstance(torch_sparse, Exception):
            t["torch_semi_structured_eager"] = None
            torch_err = f"{type(torch_sparse).__name__}: {torch_sparse}"
        else:
            t["torch_semi_structured_eager"] = _safe_time([lambda: F.linear(x, torch_sparse)], graph=False)
            torch_err = None
        choice = mods[0].choose(m)
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
        "tuning_times_ms": choice.times_ms, "max_rel_err": err, "torch_semi_structured_error": torch_err,
        "speedup_graph": ratio("dense_graph", "sparse_graph"), "speedup_eager": ratio("dense_eager", "sparse_eager"),
        "speedup_torch_semi_structured_eager": ratio("dense_eager", "torch_semi_structured_eager"),
    }
    RESULTS["cases"].append(case)
    _write()  # after every case, so a time-out still leaves the measured part
    benchmark.extra_info.update(case)
    print(f"\n{shape} {case['dtype']} M={m}: path={choice.path} graph {case['speedup_graph']} eager "
          f"{case['speedup_eager']} torch {case['speedup_torch_semi_structured_eager']}")
    assert err < 5e-2


def _write():
    RESULTS["env"] = env_info()
    RESULTS["tuning_table"] = {k: {str(b): c.to_json() for b, c in v.items()} for k, v in TABLE.entries.items()}
    RESULTS["method"] = ("times are medians of CUDA-event timings; *_graph: one CUDA graph replaying the call "
                         "over several weight copies (> 2x L2 bytes); *_eager: the same loop in eager mode; "
                         "speedup = dense time / sparse time")
    path = os.environ.get("SPARSE24_RESULTS", os.path.join(os.path.dirname(__file__), "results", "sparse24_h100.json"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(RESULTS, f, indent=1)


def test_write_results():
    _write()
    assert RESULTS["cases"]
