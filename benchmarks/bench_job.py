"""The whole pruning job at 7B and 13B: LLaMA-shaped random fp16 checkpoints saved as safetensors directories,
128 x 2048 calibration tokens, Wanda and SparseGPT at 50%, on one GPU.

* ``memory``: the checkpoint loaded with ``from_pretrained`` onto the GPU, then ``prune_model`` (load time
  reported apart, not in the job's total).
* ``stream``: ``prune_pretrained`` from the directory to a new output directory: layers read from disk when
  walked and written to the output's shards while the next layer computes (the total includes reading,
  writing and the commit), with a GPU memory budget of ``STREAM_GPU_MEMORY`` (6 GB; the calibration
  activations then wait in pinned CPU memory, each batch prefetched to the GPU).
Each case runs in its own process, so its peak CPU memory (``ru_maxrss``) and peak GPU memory
(``max_memory_allocated``) are its own. Figures: the report's per-stage seconds, total seconds, peaks,
and ``ratio_to_floor`` = total / floor, the floor being two forward passes of every decoder layer over the
calibration set (the statistics pass and the recompute pass), timed in the same process on one random
layer of the same shape with the attention the job's model uses (SDPA). A projection for 70B scales the
measured 13B streamed per-stage seconds per layer to a 70B layer (80 layers of hidden 8192, intermediate
28672, 8 key/value heads): the solve by its cost (SparseGPT: sum of out * in^2 + in^3 over the Linears;
Wanda: the weights), every other stage by the weights per layer.
Weights are cold: every layer is read once from host memory or disk per run. Kernels are warm: each case first
prunes a one-layer model of the same shape (Triton compilation and autotuning, cached on disk after a first run).

``test_statistics`` times one LLaMA-7B decoder layer's Hessian accumulation over the calibration set (fp16
activations, 16 batches of 8 x 2048 tokens): the per-Linear fp32 form (every Linear casts its input to fp32
and multiplies on CUDA cores: q, k, v, o, gate, up, down) as the baseline, against the shared tensor-core
form (one fp32-accumulated fp16 GEMM per distinct input: q/k/v, o, gate/up, down). Results: ``results/job.json``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import QUICK, Results, ratio, requires_cuda

pytestmark = requires_cuda

NSAMPLES, SEQLEN = (32, 2048) if QUICK else (128, 2048)
BATCH = 8
SHAPES = tuple(os.environ.get("LLMPRUNE_BENCH_SHAPES", "llama-7b" if QUICK else "llama-7b,llama-13b").split(","))
CASES = {  # shape -> (method, mode) pairs
    "llama-7b": [("wanda", "memory"), ("wanda", "stream"), ("sparsegpt", "memory"), ("sparsegpt", "stream")],
    "llama-13b": [("wanda", "stream"), ("sparsegpt", "stream")],
}
if os.environ.get("LLMPRUNE_BENCH_CASES"):  # e.g. "sparsegpt:stream,wanda:memory": only these, in this order
    _pick = [tuple(c.split(":")) for c in os.environ["LLMPRUNE_BENCH_CASES"].split(",")]
    CASES = {k: [c for c in _pick if c in v] for k, v in CASES.items()}
CASE_TIMEOUT_S = 600
STREAM_GPU_MEMORY = os.environ.get("LLMPRUNE_BENCH_GPU_MEMORY", "6GB")


def _linears(shape: str) -> list[tuple[int, int]]:
    """(out, in) of the Linears of one decoder layer: q, k, v, o, gate, up, down."""
    from llmprune_kernels.testing.checkpoints import SHAPES as S

    s = S[shape]
    h, i = s["hidden_size"], s["intermediate_size"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def _layer_params(shape: str) -> int:
    return sum(o * i for o, i in _linears(shape))


def _solve_cost(shape: str, method: str) -> int:
    """What a layer's solve scales with: SparseGPT's blocked update and inverse, sum of out * in^2 + in^3;
    Wanda's per-row selection, the weight count."""
    if method == "sparsegpt":
        return sum(o * i * i + i ** 3 for o, i in _linears(shape))
    return _layer_params(shape)


def project(fig: dict, shape: str, target: str = "llama-70b") -> dict:
    """Per-stage seconds of ``fig`` (a streamed run of ``shape``) scaled to ``target``: per layer, the solve by
    ``_solve_cost``, every other stage by the weights per layer (statistics, recompute: FLOPs at a fixed token
    count; load, write: bytes), times the target's layer count."""
    from llmprune_kernels.testing.checkpoints import SHAPES as S

    n, n_t = S[shape]["num_hidden_layers"], S[target]["num_hidden_layers"]
    weights = _layer_params(target) / _layer_params(shape)
    solve = _solve_cost(target, fig["method"]) / _solve_cost(shape, fig["method"])
    stages = {k: v / n * (solve if k == "solve" else weights) * n_t for k, v in fig["stages_s"].items()}
    return {"total_s": sum(stages.values()), "stages_s": stages, "scale_weights": weights, "scale_solve": solve,
            "from": fig["case"]}


def _floor_s(cfg, device: str) -> float:
    """Seconds of two forward passes of all decoder layers over the calibration set (one layer timed)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg._attn_implementation = "sdpa"  # as from_pretrained / from_config choose for LLaMA
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            layer = LlamaDecoderLayer(cfg, 0).eval()
            rotary = LlamaRotaryEmbedding(cfg)
    finally:
        torch.set_default_dtype(prev)
    h = torch.randn(BATCH, SEQLEN, cfg.hidden_size, device=device, dtype=torch.float16)
    pos = torch.arange(SEQLEN, device=device)[None]
    pe = rotary(h, pos)
    with torch.no_grad():
        def one_pass():
            for _ in range(NSAMPLES // BATCH):
                layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
        one_pass()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        one_pass()
        torch.cuda.synchronize()
        per_pass = time.perf_counter() - t0
    return 2 * cfg.num_hidden_layers * per_pass


def _warm_up(cfg, method: str) -> None:
    """Compile and tune the method's kernels for these widths (Triton JIT, autotuning) on a one-layer model of the
    same shape, so the timed run measures the job, not the first call's compilation (a cached state every run
    after a user's first has)."""
    import copy

    from transformers import AutoModelForCausalLM

    from llmprune_kernels import prune_model
    from llmprune_kernels.validation import SparsityConfig

    one = copy.deepcopy(cfg)
    one.num_hidden_layers = 1
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(one, dtype=torch.float16).eval()
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQLEN))
    prune_model(model, ids, method, SparsityConfig(0.5), device="cuda", batch_size=BATCH, measure_error=False,
                progress=False)
    del model
    torch.cuda.synchronize()


def worker(spec: dict) -> dict:
    """One case in this process; returns its figures (printed as JSON by ``__main__``)."""
    import resource

    from transformers import AutoConfig, AutoModelForCausalLM

    from llmprune_kernels import prune_model, prune_pretrained
    from llmprune_kernels.pipeline.memory import parse_bytes
    from llmprune_kernels.validation import SparsityConfig

    source, method, mode = Path(spec["source"]), spec["method"], spec["mode"]
    cfg = AutoConfig.from_pretrained(source)
    floor = _floor_s(cfg, "cuda")
    _warm_up(cfg, method)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(1)
    calib = torch.randint(0, cfg.vocab_size, (NSAMPLES, SEQLEN))
    config = SparsityConfig(0.5)
    load_s = None
    t0 = time.perf_counter()
    if mode == "memory":
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float16, device_map="cuda")
        torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = prune_model(model, calib, method, config, device="cuda", batch_size=BATCH, measure_error=False,
                          progress=False)
    else:
        res = prune_pretrained(source, spec["output"], calib, method, config, device="cuda", batch_size=BATCH,
                               measure_error=False, progress=False, gpu_memory=parse_bytes(STREAM_GPU_MEMORY))
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    return {
        "shape": spec["shape"], "method": method, "mode": mode, "layers": cfg.num_hidden_layers,
        "calibration": [NSAMPLES, SEQLEN], "batch_size": BATCH, "sparsity": 0.5,
        "gpu_memory_budget": STREAM_GPU_MEMORY if mode == "stream" else None,
        "total_s": total, "load_s": load_s, "stages_s": dict(getattr(res, "stage_times_s", {}) or {}),
        "floor_two_forward_passes_s": floor, "ratio_to_floor": ratio(total, floor),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
        "peak_cpu_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cpu_rss_before_job_bytes": rss0,
        "model_bytes": sum(f.stat().st_size for f in source.glob("*.safetensors")),
        "overall_sparsity": res.overall_sparsity, "activations_offloaded": res.activations_offloaded,
    }


def _run_case(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True,
                         timeout=CASE_TIMEOUT_S, cwd=Path(__file__).parent)
    if out.returncode != 0:
        raise RuntimeError(f"case {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results(env):
    res = Results("job", __doc__, env)
    return res


@pytest.fixture(scope="module")
def workdir():
    root = Path(os.environ.get("LLMPRUNE_BENCH_DATA", tempfile.gettempdir())) / "llmprune_bench_job"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("shape", SHAPES)
def test_job(benchmark, results, workdir, shape):
    from llmprune_kernels.testing.checkpoints import write_random_llama

    t0 = time.perf_counter()
    source = write_random_llama(workdir / shape, shape, device="cuda")
    write_s = time.perf_counter() - t0
    figs = []
    for method, mode in CASES[shape]:
        output = workdir / f"{shape}-{method}-{mode}-out"
        fig = _run_case({"shape": shape, "source": str(source), "output": str(output), "method": method,
                         "mode": mode})
        shutil.rmtree(output, ignore_errors=True)
        fig.update({"case": f"{shape} {method} 50% {mode}", "checkpoint_write_s": write_s,
                    "baseline": "two forward passes of every decoder layer over the calibration set"})
        figs.append(results.add(fig))
    shutil.rmtree(source, ignore_errors=True)
    if shape == "llama-13b":
        results.set("projection_70b_stream", {
            "method": "13B streamed per-stage seconds per layer, scaled per stage to a 70B layer (solve: SparseGPT "
                      "by sum out*in^2 + in^3, Wanda by weights; other stages by weights), x 80 layers",
            **{f["method"]: project(f, shape) for f in figs if f["mode"] == "stream"}})
    benchmark.extra_info["figures"] = figs
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figures above are the measurement


def test_statistics(benchmark, results):
    """Hessian accumulation of one 7B decoder layer: per-Linear fp32 against shared tensor-core GEMMs."""
    from conftest import replayer, time_interleaved

    from llmprune_kernels.ops.sparsegpt import gram_add_

    h, i = 4096, 11008
    torch.manual_seed(0)
    xs = {w: torch.randn(BATCH * SEQLEN, w, device="cuda", dtype=torch.float16) for w in (h, i)}
    H = {w: torch.zeros(w, w, device="cuda") for w in (h, i)}
    per_linear = [h] * 6 + [i]  # q, k, v, o, gate, up read width h; down reads width i
    shared = [h, h, h, i]  # q/k/v, o, gate/up, down
    nb = NSAMPLES // BATCH

    def fp32_per_linear():
        for _ in range(nb):
            for w in per_linear:
                xf = xs[w].float()
                H[w].addmm_(xf.t(), xf)

    def tensor_cores_shared():
        for _ in range(nb):
            for w in shared:
                gram_add_(H[w], xs[w])

    ms = time_interleaved({"fp32_per_linear": replayer(fp32_per_linear, 1, graph=False),
                           "tensor_cores_shared": replayer(tensor_cores_shared, 1, graph=False)}, trials=3)
    fig = {"case": "llama-7b one decoder layer, Hessians over 128 x 2048 tokens", "ms": ms,
           "baseline": "fp32_per_linear", "ratios": {"speedup": ratio(ms["fp32_per_linear"], ms["tensor_cores_shared"])},
           "per_model_s": {k: v * 32 / 1000 for k, v in ms.items()}, "cache": "activations resident on the GPU"}
    results.add(fig)
    benchmark.extra_info["figure"] = fig
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
