"""Fused score-and-mask and activation-norm kernels vs their baselines, timed in the same run (issue 4).

Run on a CUDA machine:  pytest benchmarks/bench_score_mask.py --benchmark-json=raw.json
Every figure is a median of CUDA-event timings with the L2 cache flushed before each call
(``triton.testing.do_bench``); ratios are against baselines measured in the same process:

* ``copy_floor``: a Triton elementwise kernel moving the kernel's bytes (W and the norm row read, a bool
  mask written) with no selection; also ``torch.lt(W, norm_row, out=mask)`` and ``W.copy_`` for scale.
* ``reference_sort``: the reference path (fp32 score, stable ``torch.sort`` per row, scatter).
* N:M: the reference ``prune_nm`` (sort per group), a vectorised ``topk``, and the Python loop over
  groups of the Wanda repository (``prune_n:prune_m`` branch of ``prune_wanda``).
* statistics: ``x.sum(0)`` (one read of the activations) and the reference ``ActNormStats.add_batch``.

The results JSON (GPU name, versions, date, every timing and ratio) goes to ``$LLMPRUNE_BENCH_OUT`` or
``benchmarks/results/score_mask_<gpu>.json``.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

if torch.cuda.is_available():
    import triton
    import triton.testing
    from copy_floor_kernel import BLOCK as CF_BLOCK, WARPS as CF_WARPS, copy_floor_kernel

from llmprune_kernels import ActNormStats, SparsityConfig
from llmprune_kernels.ops.act_norm import TritonActNormStats, act_norm_update_
from llmprune_kernels.ops.score_mask import score_and_mask
from llmprune_kernels.reference.wanda import mask_from_score, wanda_score

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # LLaMA-7B q/k/v/o, gate/up (out x in), down
RESULTS: dict = {"score_mask": [], "modes": [], "tuning": [], "select": [], "act_norm": []}


@pytest.fixture(scope="module", autouse=True)
def _write_results(env_info):
    yield
    if torch.cuda.is_available():
        dump_results(env_info)


def dump_results(env_info: dict) -> None:
    gpu = torch.cuda.get_device_name(0)
    slug = "h100" if "H100" in gpu else "".join(ch if ch.isalnum() else "_" for ch in gpu.lower())
    out = os.environ.get("LLMPRUNE_BENCH_OUT", f"benchmarks/results/score_mask_{slug}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as fh:
        json.dump({"env": env_info, **RESULTS, "llama7b_linear_total_s": llama7b_totals()}, fh, indent=1)


def llama7b_totals() -> dict:
    """Seconds for the 224 Linears of LLaMA-7B: 32 x (4 x 4096x4096 + 2 x 11008x4096 + 4096x11008)."""
    counts = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}
    totals = {}
    for pattern in ("50%", "2:4"):
        rows = {tuple(r["shape"]): r["ms"] for r in RESULTS["score_mask"] if r["pattern"] == pattern}
        if set(rows) >= set(counts):
            for key in rows[(4096, 4096)]:
                if all(key in rows[s] for s in counts):
                    totals[f"{pattern}/{key}"] = 32 * sum(n * rows[s][key] for s, n in counts.items()) / 1e3
    return totals


def copy_floor(w: torch.Tensor, f: torch.Tensor, out: torch.Tensor) -> None:
    rows, cols = w.shape
    copy_floor_kernel[(rows, triton.cdiv(cols, CF_BLOCK))](w, f, out.view(torch.uint8), cols, BLOCK=CF_BLOCK,
                                                           num_warps=CF_WARPS)


def ms(fn, rep: int = 200) -> float:
    """Median milliseconds per call, L2 flushed before each call."""
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def slow_ms(fn, iters: int = 3) -> float:
    """Mean milliseconds of a slow host-driven baseline (after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / iters


def wanda_repo_nm(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask as the Wanda repository computes it: a Python loop over groups of m columns."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    for ii in range(score.shape[1]):
        if ii % m == 0:
            tmp = score[:, ii:(ii + m)].float()
            mask.scatter_(1, ii + torch.topk(tmp, n, dim=1, largest=False)[1], True)
    return mask


def topk_nm(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    groups = score.view(score.shape[0], -1, m)
    idx = torch.topk(groups, n, dim=-1, largest=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).view_as(score)


def setup(shape, dtype=torch.float16):
    w = torch.randn(shape, device="cuda", dtype=dtype)
    norm = torch.rand(shape[1], device="cuda") * 4
    return w, norm


def graphed(fn):
    """``fn`` captured in a CUDA graph (after a warm-up call): the replay's host cost (a few µs) stays hidden
    behind ``do_bench``'s L2 flush, so the timing is the GPU's alone. Eager calls of a ~50 µs kernel can
    be host-bound (Python checks, allocation, launch), which made eager timings of the same code bimodal."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def _sync(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("pattern", ["50%", "2:4"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_score_mask(benchmark, shape, pattern):
    w, norm = setup(shape)
    cfg = SparsityConfig(0.5) if pattern == "50%" else SparsityConfig(n=2, m=4)
    ref_fn = lambda: mask_from_score(wanda_score(w, norm), cfg)  # noqa: E731
    assert torch.equal(score_and_mask(w, norm, cfg), ref_fn())
    mask_buf = torch.empty(shape, dtype=torch.bool, device="cuda")
    wc, norm_row = w.clone(), norm[None, :]
    # GPU time through CUDA graphs (see ``graphed``); ``kernel_eager`` / ``kernel_checked``: eager calls
    t = {
        "kernel": ms(graphed(lambda: score_and_mask(w, norm, cfg, check=False))),
        "kernel_eager": ms(lambda: score_and_mask(w, norm, cfg, check=False)),
        "kernel_checked": ms(lambda: score_and_mask(w, norm, cfg)),
        "kernel_packed_only": ms(graphed(lambda: score_and_mask(w, norm, cfg, mask=False, packed=True, check=False))),
        "restore_w": ms(graphed(lambda: wc.copy_(w))),
        "restore_w_plus_inplace": ms(graphed(lambda: (wc.copy_(w), score_and_mask(wc, norm, cfg, inplace=True,
                                                                                  mask=False, check=False)))),
        "copy_floor": ms(graphed(lambda: copy_floor(w, norm, mask_buf))),
        "torch_lt_same_bytes": ms(graphed(lambda: torch.lt(w, norm_row, out=mask_buf))),
        "reference": ms(ref_fn, rep=500),
        # part of "kernel": the fp32 sqrt of the norms (the factor the kernel reads), a kernel of its own
        "norm_sqrt": ms(graphed(lambda: torch.sqrt(norm.float()))),
    }
    t["kernel_inplace"] = t["restore_w_plus_inplace"] - t["restore_w"]
    if cfg.is_nm:
        t["topk_nm"] = ms(lambda: topk_nm(wanda_score(w, norm), 2, 4), rep=500)
        t["wanda_repo_loop"] = slow_ms(lambda: wanda_repo_nm(wanda_score(w, norm), 2, 4))
    ratios = {
        "kernel_over_copy_floor": t["kernel"] / t["copy_floor"],
        "reference_over_kernel": t["reference"] / t["kernel"],
    }
    if cfg.is_nm:
        ratios["topk_nm_over_kernel"] = t["topk_nm"] / t["kernel"]
        ratios["wanda_repo_loop_over_kernel"] = t["wanda_repo_loop"] / t["kernel"]
    gbytes = (w.numel() * (w.element_size() + 1) + norm.numel() * 4) / 1e9
    row = {"shape": list(shape), "dtype": "float16", "pattern": pattern, "ms": t, "ratios": ratios,
           "kernel_GBps": gbytes / (t["kernel"] / 1e3), "copy_floor_GBps": gbytes / (t["copy_floor"] / 1e3)}
    RESULTS["score_mask"].append(row)
    benchmark.extra_info.update(row)
    benchmark.pedantic(_sync(lambda: score_and_mask(w, norm, cfg, check=False)), rounds=30, warmup_rounds=5)


@pytest.mark.parametrize("mode", ["gblm", "ria"])
def test_modes(benchmark, mode):
    w, norm = setup((4096, 4096))
    cfg = SparsityConfig(0.5)
    kw = {"grad": (torch.rand_like(w) * 0.05)} if mode == "gblm" else {"ria": True}
    t = {"kernel": ms(graphed(lambda: score_and_mask(w, norm, cfg, check=False, **kw))),
         "wanda_kernel": ms(graphed(lambda: score_and_mask(w, norm, cfg, check=False)))}
    row = {"mode": mode, "shape": [4096, 4096], "ms": t}
    RESULTS["modes"].append(row)
    benchmark.extra_info.update(row)
    benchmark.pedantic(_sync(lambda: score_and_mask(w, norm, cfg, check=False, **kw)), rounds=10, warmup_rounds=2)


def _variants(cols: int) -> list[dict]:
    """Launch variants of the unstructured kernel for one row width ({} = the defaults: "hist")."""
    return [{}, {"elems_per_warp": 512}, {"elems_per_warp": 2048}, {"bits": 10}, {"maxnreg": 96},
            {"select": "radix1"}]


@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 11008), (2048, 28672)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_tuning_sweep(benchmark, shape):
    """Unstructured 50% and 2:4 under launch variants, each checked against the reference mask."""
    w, norm = setup(shape)
    cfg = SparsityConfig(0.5)
    ref = mask_from_score(wanda_score(w, norm), cfg)
    rows = []
    for tune in _variants(shape[1]):
        try:
            assert torch.equal(score_and_mask(w, norm, cfg, _tune=tune), ref)
            rows.append({"tune": tune, "ms": ms(graphed(lambda tune=tune: score_and_mask(w, norm, cfg, check=False,
                                                                                         _tune=tune)), rep=100)})
        except Exception as exc:  # e.g. out of registers/shared memory for a variant: record, go on
            rows.append({"tune": tune, "error": repr(exc)[:300]})
    cfg24 = SparsityConfig(n=2, m=4)
    ref24 = mask_from_score(wanda_score(w, norm), cfg24)
    for nm_tune in [{}, {"tile": 2048}, {"tile_cols": 128}]:
        assert torch.equal(score_and_mask(w, norm, cfg24, _tune=nm_tune), ref24)
        rows.append({"nm": "2:4", "tune": nm_tune,
                     "ms": ms(graphed(lambda t=nm_tune: score_and_mask(w, norm, cfg24, check=False, _tune=t)), rep=100)})
    mask_buf = torch.empty_like(w, dtype=torch.bool)
    entry = {"shape": list(shape), "copy_floor_ms": ms(graphed(lambda: copy_floor(w, norm, mask_buf))), "variants": rows}
    best = min((r for r in rows if "ms" in r and "nm" not in r), key=lambda r: r["ms"])
    entry["best_unstructured"] = best
    RESULTS["tuning"].append(entry)
    benchmark.extra_info.update(entry)
    benchmark.pedantic(_sync(lambda: score_and_mask(w, norm, cfg, check=False)), rounds=5, warmup_rounds=1)


# Sample-bracket selection ("sample", opt-in): defaults, one warp per 512 columns, and the bracket switched
# off (its radix-search fallback alone on the [rows, BLOCK] tile), against the default bitwise radix ("radix1")
SAMPLE_VARIANTS = [{"select": "sample"}, {"select": "sample", "elems_per_warp": 512},
                   {"select": "sample", "bracket": False}]
# Interpolation bracket ("interp", opt-in): default (one warp per 1024 padded columns), half and twice the
# warps. sample (timed 3-4x slower than radix1 on the H100,
# results/score_mask_select_h100.json of 2026-11-23) is timed again only with LLMPRUNE_BENCH_SAMPLE=1:
# each variant is a Triton compile per width, slow on the H100 machine
INTERP_VARIANTS = [{"select": "interp"}, {"select": "interp", "elems_per_warp": 2048},
                   {"select": "interp", "elems_per_warp": 512}]
# Histogram radix select ("hist", the default): defaults (shared-memory histogram in PTX, per-warp bin scans,
# atomic min/max, 4 columns per access, register caps by keys per thread, two-piece rows), no register cap,
# one padded piece, 7- and 10-bit digits, half the warps, a tighter cap, block-wide scans with Triton's
# min/max, Triton's choice of 16 columns per access, and Triton's own tl.histogram (warp ballots) instead of
# the PTX histogram
HIST_VARIANTS = [{"select": "hist"}, {"select": "hist", "maxnreg": 255}, {"select": "hist", "split": False},
                 {"select": "hist", "bits0": 7, "bits": 7}, {"select": "hist", "bits": 10},
                 {"select": "hist", "elems_per_warp": 512, "maxnreg": 48}, {"select": "hist", "maxnreg": 56},
                 {"select": "hist", "wscan": False, "amm": False}, {"select": "hist", "vec": 16},
                 {"select": "hist", "asm": False}]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_select_variants(benchmark, shape, env_info):
    """The bitwise radix select ("radix1", the earlier default) vs "hist" variants (and, on request, "interp" and
    "sample") at 50%, fp16: every variant's mask is checked equal to the reference at full size before it is
    timed."""
    w, norm = setup(shape)
    cfg = SparsityConfig(0.5)
    ref_fn = lambda: mask_from_score(wanda_score(w, norm), cfg)  # noqa: E731
    ref = ref_fn()
    rows = []
    extra = SAMPLE_VARIANTS if os.environ.get("LLMPRUNE_BENCH_SAMPLE") == "1" else []
    extra += INTERP_VARIANTS if os.environ.get("LLMPRUNE_BENCH_INTERP") == "1" else []
    variants = json.loads(os.environ.get("LLMPRUNE_BENCH_SELECT_VARIANTS", "null")) or HIST_VARIANTS + extra
    for tune in [{"select": "radix1"}] + variants:
        try:
            assert torch.equal(score_and_mask(w, norm, cfg, _tune=tune), ref), f"mask differs for {tune}"
            rows.append({"tune": tune, "trials_ms": [],
                         "fn": graphed(lambda tune=tune: score_and_mask(w, norm, cfg, check=False, _tune=tune))})
        except Exception as exc:  # e.g. a variant that does not compile on this Triton: record, go on
            rows.append({"tune": tune, "error": repr(exc)[:300]})
    mask_buf = torch.empty_like(w, dtype=torch.bool)
    # interleaved trials (every variant and both baselines once per trial), medians over trials: run-to-run
    # drift of the clocks then moves all of them alike instead of favouring whichever ran first
    floors, refs = [], []
    floor_fn = graphed(lambda: copy_floor(w, norm, mask_buf))
    for _ in range(int(os.environ.get("LLMPRUNE_BENCH_TRIALS", "5"))):
        floors.append(ms(floor_fn, rep=50))
        refs.append(ms(ref_fn, rep=50))
        for r in rows:
            if "trials_ms" in r:
                r["trials_ms"].append(ms(r["fn"], rep=50))
    floor, ref_ms = statistics.median(floors), statistics.median(refs)
    for r in rows:
        r.pop("fn", None)
        if "trials_ms" in r:
            r["ms"] = statistics.median(r["trials_ms"])
            r["over_copy_floor"] = r["ms"] / floor
            r["reference_over"] = ref_ms / r["ms"]
    timed = [r for r in rows if "ms" in r]
    entry = {"shape": list(shape), "dtype": "float16", "pattern": "50%", "copy_floor_ms": floor,
             "reference_ms": ref_ms, "copy_floor_trials_ms": floors, "reference_trials_ms": refs, "variants": rows,
             "best": min(timed, key=lambda r: r["ms"]) if timed else None}
    RESULTS["select"].append(entry)
    dump_results(env_info)  # after every shape: a run cut short by a timeout still leaves its figures
    benchmark.extra_info.update(entry)
    benchmark.pedantic(_sync(lambda: score_and_mask(w, norm, cfg, check=False)), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("shape", [(2048, 4096), (2048, 11008), (8192, 4096), (2048, 28672)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_act_norm(benchmark, shape):
    tokens, width = shape
    x = torch.randn(1, tokens, width, device="cuda", dtype=torch.float16)
    stats, ref = TritonActNormStats(width, device="cuda"), ActNormStats(width, device="cuda")
    stats.add_batch(x)
    ref.add_batch(x)
    torch.testing.assert_close(stats.scaler_row, ref.scaler_row, rtol=2e-6, atol=0)
    configs = {}
    for cfg in [(256, 32, 4), (512, 16, 4), (1024, 16, 8), (256, 64, 8)]:
        configs[str(cfg)] = ms(lambda: act_norm_update_(stats, x, check=False, _config=cfg))
    t = {
        "kernel": ms(lambda: act_norm_update_(stats, x, check=False)),
        "kernel_checked": ms(lambda: act_norm_update_(stats, x)),
        "read_once_sum0": ms(lambda: x.sum(1)),
        "copy": ms(lambda: x.clone()),
        "reference": ms(lambda: ref.add_batch(x)),
    }
    ratios = {"kernel_over_read_once": t["kernel"] / t["read_once_sum0"],
              "kernel_checked_over_read_once": t["kernel_checked"] / t["read_once_sum0"],
              "reference_over_kernel": t["reference"] / t["kernel"]}
    gbytes = x.numel() * x.element_size() / 1e9
    row = {"shape": [tokens, width], "dtype": "float16", "ms": t, "ratios": ratios, "configs_ms": configs,
           "kernel_GBps": gbytes / (t["kernel"] / 1e3), "read_once_GBps": gbytes / (t["read_once_sum0"] / 1e3)}
    RESULTS["act_norm"].append(row)
    benchmark.extra_info.update(row)
    benchmark.pedantic(_sync(lambda: act_norm_update_(stats, x, check=False)), rounds=30, warmup_rounds=5)
