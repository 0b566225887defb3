"""End to end on a LLaMA-7B-shaped model (hidden 4096, intermediate 11008, 32 heads, vocabulary 32000; random
weights, fp16, a few decoder layers), the whole job through the package's public entry points.

* ``test_prune``: ``prune_model`` with Wanda and SparseGPT (unstructured 50% and 2:4) on random calibration
  token windows, our kernels (Wanda ``backend="triton"``, SparseGPT ``backend="ext"``) against the PyTorch
  reference backend of the same method on a copy of the same model, same run (after a warm-up prune of a
  one-layer model compiles the kernels). Stages from ``PruneResult``: ``capture`` (embeddings up to the
  first layer), ``statistics_and_propagation`` (the layers' forward passes feeding the method's statistics,
  and the pruned outputs passed on), ``prune_calls`` (the methods' per-Linear ``prune()``), ``total``.
  ``speedup_<stage>`` = reference seconds / kernel seconds.
* ``test_decode``: the model pruned 2:4 (magnitude, through ``prune_model``), dense (``nn.Linear`` holding
  the 2:4 weights) against ``sparsify_``-ed (``SparseLinear``, tuned at M = 1, 128, 2048) on identical
  weights, and ``sparse_lean`` (``sparsify_(..., dense_tolerance=0.05)``: no dense copy of a weight is kept
  where a sparse path measured within 5% of dense): greedy decode with a static KV cache, one CUDA graph per
  step (tokens/s, after a 128-token prompt); prefill of a 2048-token prompt (eager, ms); eager ``generate``
  (tokens/s, bound by host time on both sides). The models are measured in alternating rounds; figures are
  medians. Weights are cold by construction: a decode step streams every layer's weights once, more than
  the L2 holds. Also: bytes of the dense Linear weights, of the packed ones, and GPU memory each sparse
  model holds (caches included); whether the prefill's last logits agree (random weights give near-flat
  logits, so greedy tokens can diverge on rounding where the logits agree).
  The same pruned weights in 8 bits (``sparsify_(..., SemiSparseWeightConfig(weight_dtype=Q8))``, Q8 = fp8 where
  the GPU has FP8, else int8): ``sparse_q8`` (16-bit activations: the 8-bit decode kernel at M <= 16) and
  ``sparse_q8_a8`` (``activations="8bit"``: prefill through cuSPARSELt's 8-bit 2:4 GEMM where tuning measured it
  faster); ``speedup_<metric>_<model>`` against dense. ``prefill_profile``: one 2048-token prefill of each model
  under ``torch.profiler``, GPU time per op (top ops, ms). ``decode_step_split``: per model, the ms of one graph
  decode step (1000 / tokens/s) and the ms of a CUDA graph that runs only the decoder's Linear modules on one
  token, in model order (cold weights, as in the step); the difference is the time of the model's other ops
  (norms, rotary, attention, cache writes, the dense lm_head), which no 2:4 format shortens, and
  ``decode_bound_<model>`` = dense step ms / that model's other-op ms: the decode speed-up the model reaches with
  free Linears.
* ``test_decode_compiled``: the same greedy graph decode with each model's forward ``torch.compile``-d (inductor,
  static shapes: the model's norms, rotary and elementwise ops fused; the 2:4 Linears run their ops, 8-bit ones
  ``decode8``'s), dense, 16-bit 2:4 and 8-bit 2:4 (tuned at M = 1), compiled the same way; ``compile_s`` includes
  the first prompt and step.
Results: ``results/e2e.json``.
"""
from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch
import torch.nn as nn

from conftest import QUICK, Results, gpu_ms, ratio, requires_cuda
from llmprune_kernels import SemiSparseWeightConfig, SparseLinear, backends, prune_model, sparsify_
from llmprune_kernels.validation import SparsityConfig

pytestmark = requires_cuda

PRUNE_LAYERS = 1 if QUICK else 2
DECODE_LAYERS = 4 if QUICK else 8
NSAMPLES, SEQLEN = (8, 2048) if QUICK else (16, 2048)
NEW_TOKENS = 32 if QUICK else 64
ROUNDS = 2 if QUICK else 3
LEAN_TOLERANCE = 0.05  # sparsify_(dense_tolerance=...): a sparse path within 5% of dense runs, no dense copy kept
PRUNE_CASES = ([("wanda", "2:4"), ("sparsegpt", "2:4")] if QUICK else
               [("wanda", "50%"), ("wanda", "2:4"), ("sparsegpt", "50%"), ("sparsegpt", "2:4")])
KERNEL_BACKEND = {"wanda": ("triton", "triton"), "sparsegpt": ("ext", "cuda")}  # option, backends() key


@pytest.fixture(scope="module")
def results(env):
    res = Results("e2e", __doc__, env)
    res.set("model", {"hidden": 4096, "intermediate": 11008, "heads": 32, "vocab": 32000, "dtype": "float16",
                      "prune_layers": PRUNE_LAYERS, "decode_layers": DECODE_LAYERS,
                      "calibration": [NSAMPLES, SEQLEN]})
    return res


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    return model, cfg


def _config(pattern: str) -> SparsityConfig:
    return SparsityConfig(n=2, m=4) if pattern == "2:4" else SparsityConfig(float(pattern.rstrip("%")) / 100)


def _stages(res) -> dict:
    prune_calls = sum(s.time_s for s in res.linears)
    layers = sum(res.layer_times_s)
    return {"capture": res.capture_time_s, "statistics_and_propagation": layers - prune_calls,
            "prune_calls": prune_calls, "total": res.total_time_s}


@pytest.mark.parametrize("method,pattern", PRUNE_CASES, ids=[f"{m}-{p}" for m, p in PRUNE_CASES])
def test_prune(benchmark, results, method, pattern):
    option, needs = KERNEL_BACKEND[method]
    if not backends()[needs]:
        pytest.skip(f"{method}'s kernels need the {needs} backend")
    cfg = _config(pattern)
    warm, _ = build(1)  # compiles and library set-up outside the timed runs
    prune_model(warm, torch.randint(0, 32000, (2, 256)), method, cfg, device="cuda", options={"backend": option},
                measure_error=False, progress=False)
    del warm
    base, _ = build(PRUNE_LAYERS)
    torch.manual_seed(1)
    calib = torch.randint(0, 32000, (NSAMPLES, SEQLEN))
    out = {}
    for backend in ("reference", option):
        model = copy.deepcopy(base)
        torch.cuda.synchronize()
        res = prune_model(model, calib, method, cfg, device="cuda", options={"backend": backend},
                          measure_error=False, progress=False)
        out[backend] = {"stages_s": _stages(res), "overall_sparsity": res.overall_sparsity}
        del model
        torch.cuda.empty_cache()
    ref, ker = out["reference"]["stages_s"], out[option]["stages_s"]
    fig = {"case": f"prune {method} {pattern}, {PRUNE_LAYERS} layers", "method": method, "pattern": pattern,
           "layers": PRUNE_LAYERS, "calibration": [NSAMPLES, SEQLEN], "kernel_backend": option,
           "kernel": out[option], "reference": out["reference"], "baseline": "reference",
           "ratios": {f"speedup_{k}": ratio(ref[k], ker[k]) for k in ref}}
    results.add(fig)
    benchmark.extra_info.update(fig)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figures above are the measurement


def _decode_graph_tok_s(model, cfg, prompt, n_new: int) -> float:
    """Greedy tokens per second with a static KV cache, each step one CUDA-graph replay."""
    from transformers import StaticCache

    p = prompt.shape[1]
    cache = StaticCache(config=cfg, max_cache_len=p + n_new + 8)
    logits = model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(p, device="cuda"),
                   use_cache=True).logits
    tok = logits[:, -1:].argmax(-1)
    pos = torch.tensor([p], device="cuda")

    def step():
        out = model(input_ids=tok, past_key_values=cache, cache_position=pos, position_ids=pos[None],
                    use_cache=True).logits
        return out[:, -1:].argmax(-1)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        nxt = step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_new):
        g.replay()
        tok.copy_(nxt)
        pos.add_(1)
    torch.cuda.synchronize()
    return n_new / (time.perf_counter() - t0)


def _prefill_ms(model, prompt, reps: int = 3) -> float:
    model(prompt, logits_to_keep=1)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        model(prompt, logits_to_keep=1)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _generate_tok_s(model, prompt, n_new: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    torch.cuda.synchronize()
    return n_new / (time.perf_counter() - t0)


def _linears_graph_ms(model) -> float:
    """ms of one pass over every decoder Linear (dense or sparse) on a one-token input, in model order, in a
    CUDA graph."""
    mods = [m for m in model.model.layers.modules() if isinstance(m, (nn.Linear, SparseLinear))]
    xs = {m.in_features: torch.randn(1, 1, m.in_features, device="cuda", dtype=torch.float16) for m in mods}
    return gpu_ms([lambda m=m: m(xs[m.in_features]) for m in mods], calls=len(mods)) * len(mods)


def _pruned_24(layers: int):
    """The LLaMA-7B-shaped model with ``layers`` decoder layers, pruned 2:4 by magnitude on the GPU."""
    model, cfg = build(layers)
    prune_model(model, None, "magnitude", SparsityConfig(n=2, m=4), device="cuda", measure_error=False,
                progress=False)
    return model, cfg


def _q8_dtype() -> str:
    return "fp8" if torch.cuda.get_device_capability() >= (8, 9) else "int8"


def _decoder_linears(module, fqn) -> bool:
    return isinstance(module, nn.Linear) and ".layers." in f".{fqn}"


def _prefill_profile(model, prompt, top: int = 12) -> dict:
    """GPU time per op of one prefill (after a warm-up), largest first."""
    from torch.profiler import ProfilerActivity, profile

    model(prompt, logits_to_keep=1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(prompt, logits_to_keep=1)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0.0)
        if t > 0:
            rows.append((e.key, t / 1e3, e.count))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    return {"gpu_ms_total": total, "top_ops": [{"op": k[:120], "gpu_ms": t, "calls": c} for k, t, c in rows[:top]]}


def test_decode(benchmark, results):
    with torch.no_grad():
        dense, cfg = _pruned_24(DECODE_LAYERS)
        torch.cuda.synchronize()
        mem0 = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        sparse = sparsify_(copy.deepcopy(dense), buckets=(1, 128, 2048))
        sparsify_s = time.perf_counter() - t0
        sparse_mem = torch.cuda.memory_allocated() - mem0
        mem1 = torch.cuda.memory_allocated()
        lean = sparsify_(copy.deepcopy(dense), buckets=(1, 128, 2048), dense_tolerance=LEAN_TOLERANCE)
        lean_mem = torch.cuda.memory_allocated() - mem1
        q8 = _q8_dtype()
        sparse_q8 = sparsify_(copy.deepcopy(dense), SemiSparseWeightConfig(weight_dtype=q8), _decoder_linears,
                              buckets=(1, 128, 2048))
        sparse_q8_a8 = sparsify_(copy.deepcopy(dense), SemiSparseWeightConfig(weight_dtype=q8, activations="8bit"),
                                 _decoder_linears, buckets=(1, 128, 2048))
        sl = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
        lin = [m for m in dense.model.layers.modules() if isinstance(m, nn.Linear)]
        torch.manual_seed(2)
        prompt = torch.randint(0, 32000, (1, 2048), device="cuda")
        short = prompt[:, :128]
        models = {"dense": dense, "sparse": sparse, "sparse_lean": lean, "sparse_q8": sparse_q8,
                  "sparse_q8_a8": sparse_q8_a8}
        runs: dict = {f"{k}_{name}": [] for k in ("decode_graph_tok_s", "prefill_2048_ms", "generate_eager_tok_s")
                      for name in models}
        for name, model in models.items():  # warm-up: compiles, plans, generation set-up
            model.generate(short, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        for _ in range(ROUNDS):
            for name, model in models.items():
                runs[f"decode_graph_tok_s_{name}"].append(_decode_graph_tok_s(model, cfg, short, NEW_TOKENS))
                runs[f"prefill_2048_ms_{name}"].append(_prefill_ms(model, prompt))
                runs[f"generate_eager_tok_s_{name}"].append(_generate_tok_s(model, short, NEW_TOKENS))
        med = {k: statistics.median(v) for k, v in runs.items()}
        ld = dense(prompt, logits_to_keep=1).logits.float()
        ls = sparse(prompt, logits_to_keep=1).logits.float()
        lq = {n: models[n](prompt, logits_to_keep=1).logits.float() for n in ("sparse_q8", "sparse_q8_a8")}
        linears_ms = {name: _linears_graph_ms(model) for name, model in models.items()}
        profiles = {name: _prefill_profile(model, prompt) for name, model in models.items() if name != "sparse_lean"}
        paths = {name: sorted({f"{m.choose(mm).path}@{mm}" for m in model.modules() if isinstance(m, SparseLinear)
                               for mm in (1, 2048)}) for name, model in models.items() if name != "dense"}
    fig = {
        "case": f"decode {DECODE_LAYERS} layers 2:4 float16", "layers": DECODE_LAYERS, "new_tokens": NEW_TOKENS,
        "rounds": ROUNDS, "sparsify_s": sparsify_s, "n_sparse_linears": len(sl), "medians": med, "runs": runs,
        "lean_dense_tolerance": LEAN_TOLERANCE,
        "baseline": "dense (nn.Linear, same weights)",
        "ratios": {"speedup_decode_graph": ratio(med["decode_graph_tok_s_sparse"], med["decode_graph_tok_s_dense"]),
                   "speedup_prefill_2048": ratio(med["prefill_2048_ms_dense"], med["prefill_2048_ms_sparse"]),
                   "speedup_generate_eager": ratio(med["generate_eager_tok_s_sparse"],
                                                   med["generate_eager_tok_s_dense"]),
                   "speedup_decode_graph_lean": ratio(med["decode_graph_tok_s_sparse_lean"],
                                                      med["decode_graph_tok_s_dense"]),
                   "speedup_prefill_2048_lean": ratio(med["prefill_2048_ms_dense"],
                                                      med["prefill_2048_ms_sparse_lean"]),
                   **{f"speedup_{k}_{n}": (ratio(med[f"{k}_sparse_{n}"], med[f"{k}_dense"]) if k.endswith("tok_s")
                                           else ratio(med[f"{k}_dense"], med[f"{k}_sparse_{n}"]))
                      for n in ("q8", "q8_a8") for k in ("decode_graph_tok_s", "prefill_2048_ms",
                                                         "generate_eager_tok_s")}},
        "q8_weight_dtype": q8, "paths_at_m": paths,
        "prefill_profile": profiles,
        "decode_step_split": {name: {"step_ms": 1000.0 / med[f"decode_graph_tok_s_{name}"], "linears_ms": ms,
                                     "other_ms": 1000.0 / med[f"decode_graph_tok_s_{name}"] - ms}
                              for name, ms in linears_ms.items()},
        "linear_weight_bytes_dense": sum(m.weight.nbytes for m in lin),
        "linear_packed_bytes_sparse": sum(b.nbytes for m in sl for b in m.buffers()),
        "model_param_bytes_dense": sum(p.nbytes for p in dense.parameters()),
        "gpu_bytes_sparse_model_with_caches": sparse_mem,
        "gpu_bytes_sparse_lean_model_with_caches": lean_mem,
        "prefill_last_logits_max_rel_diff": float((ld - ls).abs().max() / ld.abs().max()),
        "prefill_last_logits_top1_equal": bool(ld.argmax() == ls.argmax()),
        **{f"prefill_last_logits_max_rel_diff_{n}": float((ld - v).abs().max() / ld.abs().max())
           for n, v in lq.items()},
    }
    split = fig["decode_step_split"]
    fig["ratios"].update({f"decode_bound_{name}": ratio(split["dense"]["step_ms"], v["other_ms"])
                          for name, v in split.items() if name != "dense"})
    results.add(fig)
    benchmark.extra_info.update(fig)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figures above are the measurement


def test_decode_compiled(benchmark, results):
    with torch.no_grad():
        dense, cfg = _pruned_24(DECODE_LAYERS)
        models = {"dense": dense, "sparse": sparsify_(copy.deepcopy(dense), buckets=(1, 128)),
                  "sparse_q8": sparsify_(copy.deepcopy(dense), SemiSparseWeightConfig(weight_dtype=_q8_dtype()),
                                         _decoder_linears, buckets=(1, 128))}
        torch.manual_seed(2)
        short = torch.randint(0, 32000, (1, 128), device="cuda")
        compile_s, errors = {}, {}
        for name, model in list(models.items()):
            t0 = time.perf_counter()
            model.forward = torch.compile(model.forward, dynamic=False)
            try:
                _decode_graph_tok_s(model, cfg, short, 2)  # compiles the prompt's and the step's graphs
            except Exception as exc:  # a model that does not compile is reported, the others still measured
                errors[name] = f"{type(exc).__name__}: {exc}"[:500]
                del models[name]
                continue
            compile_s[name] = time.perf_counter() - t0
        runs: dict = {name: [] for name in models}
        for _ in range(ROUNDS):
            for name, model in models.items():
                runs[name].append(_decode_graph_tok_s(model, cfg, short, NEW_TOKENS))
    med = {k: statistics.median(v) for k, v in runs.items()}
    fig = {"case": f"decode compiled {DECODE_LAYERS} layers 2:4 float16", "layers": DECODE_LAYERS,
           "new_tokens": NEW_TOKENS, "rounds": ROUNDS, "q8_weight_dtype": _q8_dtype(), "compile_s": compile_s,
           "errors": errors, "medians": {f"decode_graph_compiled_tok_s_{k}": v for k, v in med.items()},
           "runs": runs, "baseline": "dense (nn.Linear, same weights), compiled the same way",
           "ratios": {f"speedup_decode_graph_compiled_{k}": ratio(v, med.get("dense")) for k, v in med.items()
                      if k != "dense"}}
    results.add(fig)
    benchmark.extra_info.update(fig)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figures above are the measurement
    assert not errors, errors
