"""The ADMM pruner (methods.admm): the least-squares optimum on a fixed support, exact sparsity, the tie rule,
determinism, option errors, lower reconstruction error than SparseGPT, CUDA against CPU, and runs through
prune_model and the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import random_ids, tiny_model

from llmprune_kernels import SparsityConfig, prune_model
from llmprune_kernels.methods import check_options, get_method
from llmprune_kernels.methods.admm import admm_prune, gradual_sparsity, select_mask
from llmprune_kernels.pipeline.models import find_decoder_layers
from llmprune_kernels.reference.sparsegpt import sparsegpt_prune

UNSTRUCTURED, NM24 = SparsityConfig(0.5), SparsityConfig(n=2, m=4)


def correlated_inputs(tokens: int, width: int, seed: int, mix: float = 2.0) -> torch.Tensor:
    """Activations with correlated columns of unequal scale, as a Linear's inputs have."""
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(width) + mix * torch.randn(width, width, generator=g) / width ** 0.5
    return (torch.randn(tokens, width, generator=g) @ A) * (0.2 + 3 * torch.rand(width, generator=g))


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 * X.T @ X / X.shape[0]


def rel_error(W: torch.Tensor, pruned: torch.Tensor, X: torch.Tensor) -> float:
    return float(((W - pruned) @ X.T).norm() / (W @ X.T).norm())


def restricted_least_squares(W: torch.Tensor, X: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per output row: argmin ||X w' - X w|| over w' zero on the mask (fp64 lstsq on the kept columns)."""
    X64, out = X.double(), torch.zeros_like(W, dtype=torch.float64)
    for r in range(W.shape[0]):
        keep = ~mask[r]
        sol = torch.linalg.lstsq(X64[:, keep], X64 @ W[r].double()).solution
        out[r, keep] = sol
    return out


@pytest.mark.parametrize("polish", [0, 24])
def test_fixed_support_reaches_the_least_squares_solution(polish):
    """Convex case (fixed mask, no dampening): ADMM converges to the closed form; CG on top gets there at once."""
    X = correlated_inputs(400, 24, seed=1, mix=0.5)
    W = torch.randn(6, 24)
    mask = torch.rand(6, 24).argsort(1) < 12
    exact = restricted_least_squares(W, X, mask)
    res = admm_prune(W, hessian(X), UNSTRUCTURED, iterations=1 if polish else 400, prune_iterations=0, percdamp=0.0,
                     polish=polish, mask=mask)
    assert torch.equal(res.mask, mask) and bool((res.weight[mask] == 0).all())
    err = float((res.weight.double() - exact).norm() / exact.norm())
    assert err < 1e-4, err
    # The reported loss is the relative reconstruction error on the calibration Hessian.
    assert res.loss == pytest.approx(rel_error(W, res.weight, X), rel=1e-3)


@pytest.mark.parametrize("config", [SparsityConfig(0.5), SparsityConfig(0.3), NM24, SparsityConfig(n=4, m=8)])
def test_masks_have_the_requested_sparsity_exactly(config):
    X = correlated_inputs(256, 72, seed=2)
    W = torch.randn(20, 72)
    res = admm_prune(W, hessian(X), config, scope="row")
    assert bool((res.weight[res.mask] == 0).all()) and bool((res.weight[~res.mask] != 0).all())
    if config.is_nm:
        groups = res.mask.reshape(20, 72 // config.m, config.m).sum(2)
        assert bool((groups == config.n).all())
        assert torch.equal(admm_prune(W, hessian(X), config).mask, res.mask)  # scope concerns unstructured only
    else:
        assert bool((res.mask.sum(1) == math.floor(72 * config.sparsity)).all())
        whole = admm_prune(W, hessian(X), config)  # the default: the lowest of the whole matrix
        assert int(whole.mask.sum()) == math.floor(W.numel() * config.sparsity)


def test_gradual_schedule_is_cubic_and_ends_at_the_target():
    values = [gradual_sparsity(0.5, t, 15) for t in range(20)]
    assert values[0] == pytest.approx(0.5 * (1 - (14 / 15) ** 3))
    assert all(a < b for a, b in zip(values[:14], values[1:15])) and values[14:] == [0.5] * 6


def test_same_inputs_same_mask_and_ties_prune_the_lower_column():
    X = correlated_inputs(128, 32, seed=3)
    W = torch.randn(16, 32)
    a, b = admm_prune(W, hessian(X), NM24), admm_prune(W.clone(), hessian(X).clone(), NM24)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)
    # Equal scores: the lower column index is pruned first (the package's tie rule), in every selection.
    ties = torch.ones(3, 8)
    assert torch.equal(select_mask(ties, UNSTRUCTURED, 0.25), torch.arange(8).expand(3, 8) < 2)
    assert torch.equal(select_mask(ties, NM24, 0.5), (torch.arange(8) % 4 < 2).expand(3, 8))
    partial = torch.zeros(3, 8, dtype=torch.bool)
    partial.view(-1)[torch.tensor([0, 1, 4, 5, 8])] = True  # N:M candidates of the matrix in row-major order
    assert torch.equal(select_mask(ties, NM24, 5 / 24), partial)
    res = admm_prune(ties, torch.eye(8), UNSTRUCTURED, prune_iterations=0, scope="row")  # dense weights' mask, fixed
    assert torch.equal(res.mask, torch.arange(8).expand(3, 8) < 4)


def test_singular_hessian_and_dead_inputs():
    """Rank-deficient H with a dead input column: dampened, finite, the dead column zero."""
    X = correlated_inputs(16, 40, seed=4)  # 16 tokens, 40 columns: rank 16
    X[:, 5] = 0
    W = torch.randn(8, 40)
    res = admm_prune(W, hessian(X), SparsityConfig(0.5))
    assert bool(torch.isfinite(res.weight).all()) and bool((res.weight[:, 5] == 0).all())
    assert res.retries == 0 and res.damp == pytest.approx(0.1, rel=1e-5)
    with pytest.raises(RuntimeError, match="rho 1"):  # no dampening left to add: an error naming the layer
        admm_prune(W, -torch.eye(40), SparsityConfig(0.5), percdamp=0.0, max_retries=0, name="L")


@pytest.mark.parametrize("options, match", [
    ({"prune_iterations": 30}, r"ADMM prune_iterations=30 is invalid; allowed: None or an integer from 0 to "
                               r"iterations \(20\)"),
    ({"iterations": 0}, r"ADMM iterations=0 is invalid; allowed: an integer >= 1"),
    ({"rho": 0}, r"ADMM rho=0\.0 is invalid; allowed: a finite number > 0"),
    ({"rho_growth": 0.5}, r"ADMM rho_growth=0\.5 is invalid; allowed: a finite number >= 1"),
    ({"percdamp": -1}, r"ADMM percdamp=-1\.0 is invalid; allowed: a finite number >= 0"),
    ({"polish": -2}, r"ADMM polish=-2 is invalid; allowed: an integer >= 0"),
    ({"scope": "column"}, r"scope='column' of method 'admm' is not of type 'row' \| 'matrix'"),
    ({"iterations": 2.5}, r"iterations=2\.5 of method 'admm' is not of type int; allowed: iterations \(int\)"),
    ({"rhoo": 1}, r"unknown option 'rhoo' for method 'admm' \(did you mean 'rho'\?\)"),
])
def test_bad_options_name_the_value_and_what_is_allowed(options, match):
    with pytest.raises(ValueError, match=match):
        check_options("admm", options)


def test_bad_mask_is_an_error():
    with pytest.raises(ValueError, match=r"L: mask must be bool of shape \(4, 8\), got torch.float32 \(4, 8\)"):
        admm_prune(torch.randn(4, 8), torch.eye(8), UNSTRUCTURED, mask=torch.zeros(4, 8), name="L")


@pytest.mark.parametrize("config", [UNSTRUCTURED, NM24])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconstruction_error_below_sparsegpt(config, seed):
    X = correlated_inputs(1024, 128, seed=seed)
    W = torch.randn(96, 128, generator=torch.Generator().manual_seed(seed + 10))
    H = hessian(X)
    ours = rel_error(W, admm_prune(W, H, config).weight, X)
    theirs = rel_error(W, sparsegpt_prune(W, H, config).weight, X)
    assert ours < 0.9 * theirs, (ours, theirs)


@pytest.mark.parametrize("config", [UNSTRUCTURED, NM24])
def test_prune_model_on_the_tiny_model(config):
    model = tiny_model("llama")
    result = prune_model(model, random_ids(4, 32), "admm", config, options={"iterations": 8, "prune_iterations": 6},
                         progress=False)
    assert result.options["iterations"] == 8 and result.options["rho"] == 1.0
    assert len(result.linears) == 14
    for s in result.linears:
        assert s.sparsity == 0.5 and 0 < s.rel_error < 1 and 0 < s.extra["admm_loss"] < 1
    q = find_decoder_layers(model)[1][1].mlp.down_proj.weight
    if config.is_nm:
        assert bool(((q == 0).reshape(q.shape[0], -1, 4).sum(2) == 2).all())
    else:  # the default scope: half of the whole matrix
        assert int((q == 0).sum()) == q.numel() // 2
    assert get_method("admm").statistic == "hessian"


def test_cli_method_admm(cli_model_dir, tmp_path, capsys):
    from llmprune_kernels.cli import main

    rep = tmp_path / "r.json"
    args = [str(cli_model_dir / "model"), "--text", str(cli_model_dir / "text.txt"), "--nsamples", "4", "--seqlen",
            "32", "--device", "cpu", "-q", "--method", "admm", "--pattern", "2:4", "--option", "iterations=6",
            "--option", "rho=0.5", "--no-eval", "--report", str(rep)]
    assert main(["prune", *args]) == 0
    report = json.loads(rep.read_text())
    assert report["method"] == "admm" and report["options"]["iterations"] == 6 and report["options"]["rho"] == 0.5
    assert all(s["sparsity"] == 0.5 and s["rel_error"] < 1 for s in report["linears"])
    capsys.readouterr()
    assert main(["methods", "admm"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("admm: ") and "iterations (int, default 20)" in text and "rho (float, default 1.0)" in text


# CUDA against CPU (fp32, TF32 off): the GEMMs and the Cholesky factor round differently. On a fixed support the
# weights agree to CUDA_WEIGHT_TOL of the largest weight; with the gradual selection to CUDA_GRADUAL_TOL (an
# intermediate selection may flip a near-tie that a later one undoes). On the CPU, perturbing this H by 1e-6
# relative moves them by at most 2e-6 and 3e-5 of it and flips no final mask entry; a final entry may flip only
# where two scores are that close: at most CUDA_MASK_FLIPS entries of the 48 x 72 may differ (one swap of a
# near-tie), none expected.
CUDA_WEIGHT_TOL = 1e-4
CUDA_GRADUAL_TOL = 1e-3
CUDA_MASK_FLIPS = 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [UNSTRUCTURED, NM24, SparsityConfig(0.7)])
def test_cuda_matches_cpu(config):
    from llmprune_kernels.ops.sparsegpt import tf32_matmul

    X = correlated_inputs(4096, 72, seed=5, mix=0.5)  # 4096 tokens, 72 columns: H well conditioned
    W = torch.randn(48, 72, generator=torch.Generator().manual_seed(15))
    H = hessian(X)
    with tf32_matmul(False):
        cpu = admm_prune(W, H, config)
        gpu = admm_prune(W.cuda(), H.cuda(), config)
        # The CPU's support fixed on both: the weight update alone, no selection in between.
        cpu_fixed = admm_prune(W, H, config, mask=cpu.mask)
        gpu_fixed = admm_prune(W.cuda(), H.cuda(), config, mask=cpu.mask.cuda())
    scale = float(cpu.weight.abs().max())
    flips = int((gpu.mask.cpu() != cpu.mask).sum())
    assert flips <= CUDA_MASK_FLIPS, f"{flips} mask entries differ between CUDA and CPU"
    assert gpu.weight.is_cuda and torch.equal(gpu_fixed.mask.cpu(), cpu.mask)
    diff = float((gpu_fixed.weight.cpu() - cpu_fixed.weight).abs().max()) / scale
    assert diff <= CUDA_WEIGHT_TOL, f"fixed-support weights differ by {diff:.2e} of the largest weight"
    if flips == 0:
        diff = float((gpu.weight.cpu() - cpu.weight).abs().max()) / scale
        assert diff <= CUDA_GRADUAL_TOL, f"weights differ by {diff:.2e} of the largest weight"
    assert gpu.loss == pytest.approx(cpu.loss, rel=1e-3)
