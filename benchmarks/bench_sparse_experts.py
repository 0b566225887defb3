"""2:4 mixture-of-experts inference: ``SparseExperts`` (one ``SparseLinear`` per expert matrix, behind the 2:4
dispatch) against the dense fused experts module it replaces, on the same 2:4-pruned weights, same run.

Case: a Mixtral-shaped experts module scaled to a quarter (8 experts, hidden 1024, expert width 3584; the full
Mixtral-8x7B one is 4096 / 14336), top-2 routing of M tokens with a random router, M = 1, 16, 256 (decode,
short and long prefill). Providers:

* ``dense_eager``: transformers' eager expert loop (``F.linear`` on each expert's slice), the baseline;
* ``dense_grouped_mm``: the same module under ``experts_implementation="grouped_mm"`` (transformers 5's
  default), for reference;
* ``sparse``: ``SparseExperts.from_experts`` of the module (``sparsify_``'s swap; tuned on CUDA).

Runs on the CPU when there is no GPU: there every SparseLinear runs the masked dense matmul (the 2:4
reference), so the CPU figures measure the module's overhead over the dense loop, not a 2:4 speed-up; the
GPU figures (CUDA-synchronised wall clock, eager: the host drives one launch per routed expert) come from
a run on a GPU. Outputs are compared with the dense eager module's. Medians of interleaved trials.
Results: ``results/sparse_experts.json``.
"""
from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch

from conftest import HAS_CUDA, QUICK, Results, ratio
from llmprune_kernels import sparsify_
from llmprune_kernels.pipeline.experts import ExpertSlice
from llmprune_kernels.reference.magnitude import magnitude_prune_
from llmprune_kernels.sparse24.experts import SparseExperts
from llmprune_kernels.validation import SparsityConfig

EXPERTS, HIDDEN, WIDTH, TOP_K = 8, 1024, 3584, 2
MS = [1, 16] if QUICK else [1, 16, 256]
TRIALS = 3 if QUICK else 7
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.float16 if HAS_CUDA else torch.float32


@pytest.fixture(scope="module")
def results(env):
    res = Results("sparse_experts", __doc__, env)
    res.set("device", torch.cuda.get_device_name(0) if HAS_CUDA else "cpu")
    return res


@pytest.fixture(scope="module")
def experts():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=HIDDEN, intermediate_size=WIDTH, num_local_experts=EXPERTS,
                        num_experts_per_tok=TOP_K)
    torch.manual_seed(0)
    mod = MixtralExperts(cfg)
    with torch.no_grad():
        for p in (mod.gate_up_proj, mod.down_proj):
            p.normal_(0, 0.02)
        for e in range(EXPERTS):  # each expert matrix 2:4 along its input dimension
            for param in ("gate_up_proj", "down_proj"):
                magnitude_prune_(ExpertSlice(mod, param, e).weight, SparsityConfig(n=2, m=4))
    return mod.to(DEVICE, DTYPE).eval()


def _sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def _time(fns: dict, trials: int, reps: int) -> dict[str, float]:
    """Median milliseconds per call of each function, the functions timed in turn within every trial."""
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm-up (tuning tables, caches, lazy imports)
        fn()
    for _ in range(trials):
        for k, fn in fns.items():
            _sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            _sync()
            times[k].append((time.perf_counter() - t0) * 1e3 / reps)
    return {k: statistics.median(v) for k, v in times.items()}


@pytest.mark.parametrize("m", MS)
@torch.no_grad()
def test_sparse_experts(results, experts, m):
    torch.manual_seed(m)
    x = torch.randn(m, HIDDEN, device=DEVICE, dtype=DTYPE)
    logits = torch.randn(m, EXPERTS, device=DEVICE)
    w, idx = torch.topk(torch.softmax(logits, -1), TOP_K, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).to(DTYPE)
    holder = torch.nn.Module()
    holder.experts = copy.deepcopy(experts)
    sparsify_(holder, buckets=tuple(MS))  # the swap a model gets (on CUDA: each expert shape tuned for these M)
    sparse = holder.experts
    assert isinstance(sparse, SparseExperts)
    cfg = experts.config

    def dense_with(impl):
        def run():
            prev, cfg._experts_implementation = cfg._experts_implementation, impl
            try:
                return experts(x, idx, w)
            finally:
                cfg._experts_implementation = prev
        return run

    fns = {"dense_eager": dense_with("eager"), "dense_grouped_mm": dense_with("grouped_mm"),
           "sparse": lambda: sparse(x, idx, w)}
    want = fns["dense_eager"]().float()
    errors = {k: float((fn().float() - want).abs().max() / want.abs().max().clamp_min(1e-30)) for k, fn in fns.items()}
    ms = _time(fns, TRIALS, reps=3 if m >= 256 else 10)
    results.add({"case": f"experts E={EXPERTS} H={HIDDEN} I={WIDTH} top-{TOP_K}, M={m}", "m": m,
                 "device": DEVICE, "dtype": str(DTYPE).removeprefix("torch."), "ms": ms, "baseline": "dense_eager",
                 "ratios": {f"speedup_{k}": ratio(ms["dense_eager"], v) for k, v in ms.items()},
                 "max_rel_error_vs_dense_eager": errors})
    assert errors["sparse"] < (1e-2 if HAS_CUDA else 1e-5)
