"""SparseGPT: the C++/CUDA extension (``ops.sparsegpt.sparsegpt_prune``, backend ``ext``) against the reference
(``reference.sparsegpt.sparsegpt_prune``, the published algorithm in PyTorch), same run, LLaMA-7B shapes.

Per shape (out x in: 4096x4096 q/k/v/o, 11008x4096 gate/up, 4096x11008 down) and pattern (unstructured
50%, 2:4): wall-clock seconds of a whole prune (dead columns, damping, inverse-Hessian factor, blocks) with
the GPU synchronised, medians over calls after a warm-up, of
* ``reference``: the baseline, a Python loop over 128-column blocks (bound by the host CPU's speed, so its
  time varies with the machine more than the GPU's figures do);
* ``ext``: the CUDA default (the fp64 one-factorisation inverse, ``fast_inverse``);
* ``ext_exact``: ``fast_inverse=False``, the reference's three-call factor (bit-identical to the reference:
  its masks are checked equal);
* ``ext_tf32``: TF32 matmuls; and ``reference_inverse_factor``: the reference's factor alone.
``speedup_*`` = reference / that path. Weights are random fp16; the Hessian comes from 8192 random
calibration tokens (rank-deficient at 11008 columns, the hardest case for agreement). Also recorded: how
far the default moves masks, weights and loss from the reference, and each factor's distance from the
factor computed in fp64. Calls take milliseconds to seconds, so the cache state does not matter. The
LLaMA-7B linear total is 32 x (4 x 4096x4096 + 2 x 11008x4096 + 4096x11008).
 Results: ``results/sparsegpt.json``.
"""
from __future__ import annotations

import functools

import pytest
import torch

from conftest import HAS_CUDA, QUICK, Results, ratio, requires_cuda, wall_s
from llmprune_kernels import backends
from llmprune_kernels.ops import sparsegpt as ops
from llmprune_kernels.reference.sparsegpt import HessianStats, inverse_hessian_factor, sparsegpt_prune
from llmprune_kernels.validation import SparsityConfig

pytestmark = [requires_cuda, pytest.mark.skipif(HAS_CUDA and not backends()["cuda"],
                                                reason="needs the CUDA build of the extension (_C)")]

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
LLAMA7B_COUNT = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}  # per decoder layer, 32 layers
PATTERNS = {"50%": SparsityConfig(0.5), "2:4": SparsityConfig(n=2, m=4)}
REF_RUNS = 1 if QUICK else 3
EXT_RUNS = 2 if QUICK else 3


@pytest.fixture(scope="module")
def results(env):
    res = Results("sparsegpt", __doc__, env)
    W, H = torch.randn(256, 256, device="cuda"), _hessian(256)  # cuBLAS / cuSOLVER / extension set-up
    for config in PATTERNS.values():
        sparsegpt_prune(W, H, config)
        for kw in ({}, {"tf32": True}, {"fast_inverse": False}):
            ops.sparsegpt_prune(W, H, config, backend="ext", **kw)
    torch.cuda.synchronize()
    return res


@functools.lru_cache(maxsize=None)
def _hessian(cols: int) -> torch.Tensor:
    torch.manual_seed(cols)
    stats = HessianStats(cols, device="cuda")
    for _ in range(4):  # 4 sequences of 2048 tokens, through the same running update as the pipeline
        stats.add_batch(torch.randn(1, 2048, cols, device="cuda", dtype=torch.float16))
    return stats.H


def layer_inputs(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The random fp16 weight (seed 0) and the Hessian of one case."""
    torch.manual_seed(0)
    return torch.randn(*shape, device="cuda", dtype=torch.float16), _hessian(shape[1])


def _rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F: a few flipped mask entries make the largest entrywise difference meaningless."""
    return float(torch.linalg.norm(a.float() - b.float()) / torch.linalg.norm(b.float()))


@functools.lru_cache(maxsize=None)
def _factor_errors(cols: int) -> tuple[float, float]:
    """Relative Frobenius error of the reference's fp32 factor and of the default (fp64, rounded once)
    factor against the factor computed entirely in fp64, for the benchmark's Hessian."""
    H = _hessian(cols).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    U_ref = inverse_hessian_factor(H.clone(), 0.01)[0].double()
    Hd = H.double()
    Hd.diagonal().add_(0.01 * torch.mean(torch.diag(H)).double())
    L = torch.linalg.cholesky(Hd.flip((0, 1)))
    eye = torch.eye(cols, device="cuda", dtype=torch.float64)
    U64 = torch.linalg.solve_triangular(L, eye, upper=False).flip((0, 1))
    norm = torch.linalg.norm(U64)
    return float(torch.linalg.norm(U_ref - U64) / norm), float(torch.linalg.norm(U64.float().double() - U64) / norm)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sparsegpt_layer(benchmark, results, shape, pattern):
    rows, cols = shape
    config = PATTERNS[pattern]
    W, H = layer_inputs(shape)
    out: dict = {}

    def keep(key, fn):
        def run():
            out[key] = fn()
        return run

    s = {}
    s["reference"], ref_runs = wall_s(keep("ref", lambda: sparsegpt_prune(W, H, config)), runs=REF_RUNS, warmup=0)
    s["reference_inverse_factor"] = wall_s(lambda: inverse_hessian_factor(H.clone(), 0.01), runs=3)[0]
    s["ext"] = wall_s(keep("ext", lambda: ops.sparsegpt_prune(W, H, config, backend="ext")[0]), runs=EXT_RUNS)[0]
    s["ext_exact"] = wall_s(keep("exact", lambda: ops.sparsegpt_prune(W, H, config, backend="ext",
                                                                      fast_inverse=False)[0]), runs=EXT_RUNS)[0]
    s["ext_tf32"] = wall_s(keep("tf32", lambda: ops.sparsegpt_prune(W, H, config, backend="ext", tf32=True)[0]),
                           runs=EXT_RUNS)[0]
    ref, ext, exact, tf32 = out["ref"], out["ext"], out["exact"], out["tf32"]
    u_ref, u_fast = _factor_errors(cols)
    scale = float(ref.weight.float().abs().max())
    fig = {
        "case": f"{rows}x{cols} float16 {pattern}", "method": "sparsegpt", "shape": [rows, cols], "dtype": "float16",
        "pattern": pattern, "times_s": s, "reference_runs_s": ref_runs, "baseline": "reference",
        "ratios": {"speedup": ratio(s["reference"], s["ext"]), "speedup_exact": ratio(s["reference"], s["ext_exact"]),
                   "speedup_tf32": ratio(s["reference"], s["ext_tf32"])},
        "exact_masks_equal_reference": bool(torch.equal(exact.mask, ref.mask)),
        "exact_max_weight_diff_rel": float((exact.weight.float() - ref.weight.float()).abs().max()) / scale,
        "default_mask_fraction_differing": float((ext.mask != ref.mask).float().mean()),
        "default_weight_diff_rel_fro": _rel_fro(ext.weight, ref.weight),
        "default_loss_rel_change": (ext.loss - ref.loss) / ref.loss,
        "factor_rel_err_reference_vs_fp64": u_ref,
        "factor_rel_err_default_vs_fp64": u_fast,
        "tf32_mask_fraction_differing": float((tf32.mask != ext.mask).float().mean()),
        "tf32_weight_diff_rel_fro": _rel_fro(tf32.weight, ext.weight),
        "tf32_loss_rel_change": (tf32.loss - ext.loss) / ext.loss,
        "damp_retries": ext.retries,
    }
    results.add(fig)
    benchmark.extra_info.update(fig)
    benchmark.pedantic(lambda: (ops.sparsegpt_prune(W, H, config, backend="ext"), torch.cuda.synchronize()),
                       rounds=1, iterations=1)
    assert fig["exact_masks_equal_reference"], "the bit-identical path's masks differ from the reference's"


def _per_layer(results, method: str, pattern: str, keys) -> dict | None:
    """Seconds of one decoder layer's Linears (``LLAMA7B_COUNT``) per timed path; None without every shape."""
    rows = {tuple(f["shape"]): f["times_s"] for f in results.data["figures"]
            if f.get("method") == method and f["pattern"] == pattern}
    if set(rows) < set(LLAMA7B_COUNT):
        return None
    return {k: sum(n * rows[s][k] for s, n in LLAMA7B_COUNT.items()) for k in keys}


def test_llama7b_total(results):
    totals = {}
    for pattern in PATTERNS:
        layer = _per_layer(results, "sparsegpt", pattern, ("reference", "ext", "ext_exact", "ext_tf32"))
        if layer is None:
            continue
        est = {k: 32 * v for k, v in layer.items()}
        totals[pattern] = {"seconds": est, "baseline": "reference",
                           "ratios": {"speedup": ratio(est["reference"], est["ext"]),
                                      "speedup_exact": ratio(est["reference"], est["ext_exact"]),
                                      "speedup_tf32": ratio(est["reference"], est["ext_tf32"])}}
    if not totals:
        pytest.skip("needs every layer figure of this run")
    results.set("llama7b_linear_total_estimate", totals)
