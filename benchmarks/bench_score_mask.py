"""Fused score-and-mask (``ops.score_mask.score_and_mask``) against its baselines, timed in the same run.

Cases: LLaMA-7B Linear shapes (out x in: 4096x4096 q/k/v/o, 11008x4096 gate/up, 4096x11008 down), fp16,
Wanda score, unstructured 50% (the default ``hist`` select; ``radix1`` alongside) and 2:4; GBLM and RIA
scores at 4096x4096. Cold weights: every timed function cycles through copies of W holding more than twice
the L2 cache. GPU figures are CUDA-graph replays (a ~30 us kernel called eagerly is bound by host time;
the eager call is reported too), medians of interleaved trials.

Baselines, each measured in the same process:
* ``copy``: a Triton elementwise kernel moving exactly the kernel's bytes (read W and the norm row, write
  a bool mask) with no selection, and ``torch.lt(W, norm_row, out=mask)`` (the same bytes through PyTorch);
  the ratio ``kernel_over_copy`` says how close the selection runs to a plain pass over the bytes.
* ``reference``: score in fp32, stable sort per row (per group of 4 for 2:4), scatter
  (``reference.wanda.mask_from_score(wanda_score(...))``); ``speedup_vs_reference`` = reference / kernel.
* 2:4 also: a vectorised ``torch.topk`` per group, and the Python loop over groups of the Wanda repository.
Every kernel mask is checked equal to the reference before timing. Results: ``results/score_mask.json``.
"""
from __future__ import annotations

import pytest
import torch

from conftest import (QUICK, Results, cold_copies, copy_floor, gpu_ms, l2_bytes, ratio, replayer,
                      requires_cuda, synced, time_interleaved, try_run, wall_s)
from llmprune_kernels.ops.score_mask import score_and_mask
from llmprune_kernels.reference.gblm import gblm_score
from llmprune_kernels.reference.ria import ria_score
from llmprune_kernels.reference.wanda import mask_from_score, wanda_score
from llmprune_kernels.validation import SparsityConfig

pytestmark = requires_cuda

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
LLAMA7B_COUNT = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}  # per decoder layer; 32 layers
PATTERNS = {"50%": SparsityConfig(0.5), "2:4": SparsityConfig(n=2, m=4)}
TRIALS = 5 if QUICK else 9


@pytest.fixture(scope="module")
def results(env):
    return Results("score_mask", __doc__, env)


def _operands(shape, n, dtype=torch.float16):
    torch.manual_seed(0)
    ws = [torch.randn(shape, device="cuda", dtype=dtype) for _ in range(n)]
    norm = torch.rand(shape[1], device="cuda") * 4
    return ws, norm


def wanda_repo_nm(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask as the Wanda repository computes it: a Python loop over groups of m columns."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    for ii in range(0, score.shape[1], m):
        tmp = score[:, ii:(ii + m)].float()
        mask.scatter_(1, ii + torch.topk(tmp, n, dim=1, largest=False)[1], True)
    return mask


def topk_nm(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    groups = score.view(score.shape[0], -1, m)
    idx = torch.topk(groups, n, dim=-1, largest=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).view_as(score)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_score_mask(benchmark, results, shape, pattern):
    cfg = PATTERNS[pattern]
    w_bytes = shape[0] * shape[1] * 2
    n = cold_copies(w_bytes + shape[0] * shape[1])  # W read, bool mask written
    ws, norm = _operands(shape, n)
    bufs = [torch.empty(shape, dtype=torch.bool, device="cuda") for _ in ws]
    norm_row = norm[None, :]
    ref = mask_from_score(wanda_score(ws[0], norm), cfg)
    assert torch.equal(score_and_mask(ws[0], norm, cfg), ref), "kernel mask differs from the reference"
    del ref
    errors: dict = {}
    graph_runs = {
        "kernel": replayer([lambda w=w: score_and_mask(w, norm, cfg, check=False) for w in ws]),
        "copy": replayer([lambda w=w, b=b: copy_floor(w, norm, b) for w, b in zip(ws, bufs)]),
        "torch_lt_same_bytes": replayer([lambda w=w, b=b: torch.lt(w, norm_row, out=b) for w, b in zip(ws, bufs)]),
        "kernel_packed_bits": try_run([lambda w=w: score_and_mask(w, norm, cfg, mask=False, packed=True, check=False)
                                       for w in ws], errors=errors, name="kernel_packed_bits"),
    }
    if not cfg.is_nm:
        radix1 = {"select": "radix1"}
        if torch.equal(score_and_mask(ws[0], norm, cfg, _tune=radix1), mask_from_score(wanda_score(ws[0], norm), cfg)):
            graph_runs["kernel_radix1"] = try_run([lambda w=w: score_and_mask(w, norm, cfg, check=False, _tune=radix1)
                                                   for w in ws], errors=errors, name="kernel_radix1")
        else:
            errors["kernel_radix1"] = "mask differs from the reference"
    t = time_interleaved(graph_runs, TRIALS)
    eager_runs = {
        "kernel_eager": replayer([lambda w=w: score_and_mask(w, norm, cfg, check=False) for w in ws], graph=False),
        "kernel_checked_eager": replayer([lambda w=w: score_and_mask(w, norm, cfg) for w in ws], graph=False),
        "reference": replayer([lambda w=w: mask_from_score(wanda_score(w, norm), cfg) for w in ws], calls=n,
                              graph=False),
    }
    if cfg.is_nm:
        eager_runs["topk_nm"] = replayer([lambda w=w: topk_nm(wanda_score(w, norm), 2, 4) for w in ws], calls=n,
                                         graph=False)
    t.update(time_interleaved(eager_runs, 3 if QUICK else 5))
    if cfg.is_nm:
        t["wanda_repo_loop"] = wall_s(lambda: wanda_repo_nm(wanda_score(ws[0], norm), 2, 4), runs=2)[0] * 1e3
    gbytes = (w_bytes + shape[0] * shape[1] + shape[1] * 4) / 1e9
    fig = {
        "case": f"{shape[0]}x{shape[1]} float16 {pattern}", "shape": list(shape), "dtype": "float16",
        "pattern": pattern, "score": "wanda", "weights": "cold", "weight_copies": n, "weight_bytes": w_bytes,
        "l2_bytes": l2_bytes(), "times_ms": t, "baseline": "copy",
        "ratios": {
            "kernel_over_copy": ratio(t["kernel"], t["copy"]),
            "kernel_over_torch_lt_same_bytes": ratio(t["kernel"], t["torch_lt_same_bytes"]),
            "speedup_vs_reference": ratio(t["reference"], t["kernel"]),
            "radix1_over_kernel": ratio(t.get("kernel_radix1"), t["kernel"]),
            "eager_over_graph": ratio(t["kernel_eager"], t["kernel"]),
            "checked_eager_over_graph": ratio(t["kernel_checked_eager"], t["kernel"]),
            "speedup_vs_topk_nm": ratio(t.get("topk_nm"), t["kernel"]),
            "speedup_vs_wanda_repo_loop": ratio(t.get("wanda_repo_loop"), t["kernel"]),
        },
        "kernel_GBps": gbytes / (t["kernel"] / 1e3), "copy_GBps": gbytes / (t["copy"] / 1e3), "errors": errors,
    }
    fig["ratios"] = {k: v for k, v in fig["ratios"].items() if v is not None}
    results.add(fig)
    benchmark.extra_info.update(fig)
    benchmark.pedantic(synced(lambda: score_and_mask(ws[0], norm, cfg, check=False)), rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("mode", ["gblm", "ria"])
def test_score_modes(benchmark, results, mode):
    """GBLM (|W| * |G| added to the Wanda score; reads G too) and RIA scores at 4096x4096, 50%."""
    shape, cfg = (4096, 4096), SparsityConfig(0.5)
    n = cold_copies(shape[0] * shape[1] * (5 if mode == "gblm" else 3))
    ws, norm = _operands(shape, n)
    grads = [torch.rand_like(w) * 0.05 for w in ws] if mode == "gblm" else [None] * n
    kw = (lambda g: {"grad": g}) if mode == "gblm" else (lambda g: {"ria": True})
    score = (lambda w, g: gblm_score(w, norm, g)) if mode == "gblm" else (lambda w, g: ria_score(w, norm))
    assert torch.equal(score_and_mask(ws[0], norm, cfg, **kw(grads[0])), mask_from_score(score(ws[0], grads[0]), cfg))
    t = time_interleaved({
        "kernel": replayer([lambda w=w, g=g: score_and_mask(w, norm, cfg, check=False, **kw(g))
                            for w, g in zip(ws, grads)]),
        "wanda_kernel": replayer([lambda w=w: score_and_mask(w, norm, cfg, check=False) for w in ws]),
    }, TRIALS)
    t["reference"] = gpu_ms([lambda w=w, g=g: mask_from_score(score(w, g), cfg) for w, g in zip(ws, grads)],
                            calls=n, graph=False, trials=3)
    fig = {"case": f"4096x4096 float16 50% {mode}", "shape": list(shape), "dtype": "float16", "pattern": "50%",
           "score": mode, "weights": "cold", "weight_copies": n, "times_ms": t, "baseline": "reference",
           "ratios": {"speedup_vs_reference": ratio(t["reference"], t["kernel"]),
                      "kernel_over_wanda_kernel": ratio(t["kernel"], t["wanda_kernel"])}}
    results.add(fig)
    benchmark.extra_info.update(fig)
    benchmark.pedantic(synced(lambda: score_and_mask(ws[0], norm, cfg, check=False, **kw(grads[0]))), rounds=10,
                       warmup_rounds=2)


def test_llama7b_total(results):
    """Seconds of masks for LLaMA-7B's 224 Linears, from this run's per-shape figures."""
    totals = {}
    for pattern in PATTERNS:
        rows = {tuple(f["shape"]): f["times_ms"] for f in results.data["figures"]
                if f.get("pattern") == pattern and f.get("score") == "wanda"}
        if set(rows) < set(LLAMA7B_COUNT):
            continue
        keys = [k for k in ("kernel", "copy", "reference", "kernel_radix1")
                if all(rows[s].get(k) is not None for s in LLAMA7B_COUNT)]
        tot = {k: 32 * sum(c * rows[s][k] for s, c in LLAMA7B_COUNT.items()) / 1e3 for k in keys}
        totals[pattern] = {"seconds": tot, "baseline": "copy",
                           "ratios": {"kernel_over_copy": ratio(tot["kernel"], tot["copy"]),
                                      "speedup_vs_reference": ratio(tot["reference"], tot["kernel"])}}
    if not totals:
        pytest.skip("needs every shape's figure from this run")
    results.set("llama7b_linear_total", totals)
