"""ADMM (``methods.admm.admm_prune``, its defaults: 20 iterations, gradual mask) against SparseGPT's CUDA default
(``ops.sparsegpt.sparsegpt_prune``, backend ``ext``) on the same W and H, LLaMA-7B shapes, timed in the same test.

Per shape (out x in: 4096x4096 q/k/v/o, 11008x4096 gate/up, 4096x11008 down) and pattern (unstructured 50%,
2:4), the W (random fp16) and H (8192 random calibration tokens) of ``bench_sparsegpt.py``: wall-clock seconds
with the GPU synchronised, medians after a warm-up (``ADMM_RUNS`` ADMM calls, ``EXT_RUNS`` SparseGPT calls);
``admm_vs_sparsegpt`` = ADMM seconds / SparseGPT seconds (the baseline); the relative reconstruction error
``sqrt(tr(E H E^T) / tr(W H W^T))`` of both (fp64, undamped H) and their ratio; the per-decoder-layer and
32-layer totals. Calls take tens of milliseconds to seconds, so the cache state does not matter.
Results: ``results/admm.json``.
"""
from __future__ import annotations

import pytest
import torch

from bench_sparsegpt import EXT_RUNS, PATTERNS, SHAPES, _hessian, _per_layer, layer_inputs
from conftest import HAS_CUDA, QUICK, Results, ratio, requires_cuda, wall_s
from llmprune_kernels import backends
from llmprune_kernels.methods.admm import admm_prune
from llmprune_kernels.ops import sparsegpt as ops

pytestmark = [requires_cuda, pytest.mark.skipif(HAS_CUDA and not backends()["cuda"],
                                                reason="needs the CUDA build of the extension (_C)")]

ADMM_RUNS = 1 if QUICK else 2  # about a second a call at 11008 columns


@pytest.fixture(scope="module")
def results(env):
    res = Results("admm", __doc__, env)
    W, H = torch.randn(256, 256, device="cuda"), _hessian(256)  # cuBLAS / cuSOLVER / extension set-up
    for config in PATTERNS.values():
        ops.sparsegpt_prune(W, H, config, backend="ext")
        admm_prune(W, H, config)
    torch.cuda.synchronize()
    return res


def _rel_error(W: torch.Tensor, pruned: torch.Tensor, H: torch.Tensor) -> float:
    """``sqrt(tr(E H E^T) / tr(W H W^T))``, ``E = W - pruned``, in fp64: the reconstruction error both methods
    minimise, on the undamped Hessian."""
    W64, H64 = W.double(), H.double()
    E = W64 - pruned.double()
    return float((((E @ H64) * E).sum() / ((W64 @ H64) * W64).sum()).clamp_min(0).sqrt())


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_admm_layer(results, shape, pattern):
    """ADMM against SparseGPT's default (``ext``) on the W and H of ``bench_sparsegpt.test_sparsegpt_layer``: time
    and error (timed by ``wall_s`` alone: no pytest-benchmark round on top, as an ADMM call is the costliest)."""
    rows, cols = shape
    config = PATTERNS[pattern]
    W, H = layer_inputs(shape)
    out: dict = {}
    s = {}
    s["sparsegpt_ext"] = wall_s(lambda: out.__setitem__("ext", ops.sparsegpt_prune(W, H, config, backend="ext")[0]),
                                runs=EXT_RUNS)[0]
    s["admm"], admm_runs = wall_s(lambda: out.__setitem__("admm", admm_prune(W, H, config)), runs=ADMM_RUNS)
    ext, admm = out["ext"], out["admm"]
    err = {"sparsegpt_ext": _rel_error(W, ext.weight, H), "admm": _rel_error(W, admm.weight, H)}
    fig = {
        "case": f"{rows}x{cols} float16 {pattern} admm", "method": "admm", "shape": [rows, cols], "dtype": "float16",
        "pattern": pattern, "times_s": s, "admm_runs_s": admm_runs, "baseline": "sparsegpt_ext",
        "ratios": {"admm_vs_sparsegpt": ratio(s["admm"], s["sparsegpt_ext"])},
        "rel_error": err, "error_ratio_admm_vs_sparsegpt": ratio(err["admm"], err["sparsegpt_ext"]),
        "admm_loss_reported": admm.loss, "admm_damp_retries": admm.retries,
        "admm_mask_fraction_differing_from_sparsegpt": float((admm.mask != ext.mask).float().mean()),
    }
    results.add(fig)
    assert bool((admm.weight[admm.mask] == 0).all()) and int(admm.mask.sum()) == admm.mask.numel() // 2


def test_llama7b_admm_total(results):
    totals = {}
    for pattern in PATTERNS:
        layer = _per_layer(results, "admm", pattern, ("sparsegpt_ext", "admm"))
        if layer is None:
            continue
        totals[pattern] = {"per_decoder_layer_s": layer, "llama7b_32_layers_s": {k: 32 * v for k, v in layer.items()},
                           "baseline": "sparsegpt_ext",
                           "ratios": {"admm_vs_sparsegpt": ratio(layer["admm"], layer["sparsegpt_ext"])}}
    if not totals:
        pytest.skip("needs every ADMM layer figure of this run")
    results.set("llama7b_admm_total_estimate", totals)


