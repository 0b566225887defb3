"""GBLM's method on the fused Triton score-and-mask kernel: masks equal to the reference's, and CUDA weights take
the kernel (the reference paths raise in that test, so a fallback fails it).

On CPU the kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1): a few rows per case.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from llmprune_kernels import SparsityConfig, get_method
from llmprune_kernels.methods import gblm as gblm_method
from llmprune_kernels.ops import score_mask
from llmprune_kernels.ops.score_mask import triton_usable
from llmprune_kernels.reference.gblm import gblm_mask

CASES = [(4, 37, SparsityConfig(0.5)), (3, 200, SparsityConfig(0.7)), (5, 64, SparsityConfig(n=2, m=4)),
         (3, 48, SparsityConfig(n=4, m=8)), (2, 24, SparsityConfig(0.0))]


def prune_with(backend, weight, grad, x, config):
    """The gblm pruner of a Linear holding ``weight``: its pruned weight, the activation norms it used, and its report."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight.clone()
    pruner = get_method("gblm")(layer, config, {"backend": backend, "gradient": grad}, layer_name="layer.q_proj")
    pruner.add_batch(x)
    extra = pruner.prune()
    return layer.weight.data, pruner.stats.value, extra


def tied(rows, cols, dtype, gen):
    """Few distinct magnitudes: rows full of equal scores (the tie rule decides)."""
    return (torch.randint(-4, 5, (rows, cols), generator=gen).float() * 0.25).to(dtype)


@pytest.mark.skipif(not triton_usable("cpu"), reason="needs Triton under TRITON_INTERPRET=1")
@pytest.mark.parametrize("rows,cols,config", CASES, ids=lambda c: getattr(c, "label", str(c)))
@pytest.mark.parametrize("dtype,gdtype", [(torch.float32, torch.float16), (torch.float16, torch.float16),
                                          (torch.bfloat16, torch.float32)])
def test_kernel_masks_equal_reference(rows, cols, config, dtype, gdtype, monkeypatch):
    gen = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(2, 6, cols, generator=gen).to(dtype)
    for weight, grad in ((torch.randn(rows, cols, generator=gen).to(dtype),
                          (torch.rand(rows, cols, generator=gen) * 0.1).to(gdtype)),
                         (tied(rows, cols, dtype, gen), (tied(rows, cols, gdtype, gen).abs() * 0.5).to(gdtype)),
                         (tied(rows, cols, dtype, gen), torch.zeros(rows, cols, dtype=gdtype))):
        with monkeypatch.context() as m:  # the triton backend must not reach the reference
            m.setattr(gblm_method, "gblm_prune_", _refuse)
            m.setattr(score_mask, "_reference_score_and_mask", _refuse)
            got, norms, extra = prune_with("triton", weight, grad, x, config)
        expected = gblm_mask(weight, norms, grad, config)
        assert extra == {"backend": "triton"}
        if not torch.equal(got == 0, expected | (weight == 0)):
            bad = ((got == 0) != (expected | (weight == 0))).nonzero()[:8].tolist()
            raise AssertionError(f"masks differ at (row, col) {bad}")
        assert torch.equal(got[~expected], weight[~expected])
        ref, ref_norms, ref_extra = prune_with("reference", weight, grad, x, config)
        assert ref_extra == {"backend": "reference"}
        torch.testing.assert_close(ref_norms, norms, rtol=2e-6, atol=0)  # Triton's and torch's norm sums


def test_backend_choice():
    layer = nn.Linear(8, 4)
    pruner = get_method("gblm")(layer, SparsityConfig(0.5), gradient=torch.rand(4, 8))
    assert pruner.backend == "reference" and not pruner.statistic_spec().triton  # CPU weights: the reference
    with pytest.raises(ValueError, match="option backend='cuda' of method 'gblm' is not of type 'auto' \\| 'reference'"):
        get_method("gblm")(layer, SparsityConfig(0.5), backend="cuda")


def _refuse(*args, **kwargs):
    raise AssertionError("the GBLM method fell back to the reference scoring")


@pytest.mark.cuda
@pytest.mark.parametrize("config", [SparsityConfig(0.5), SparsityConfig(n=2, m=4)], ids=lambda c: c.label)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_weights_use_the_kernel(config, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(256, 1024, generator=gen).to(dtype)
    grad = (torch.rand(256, 1024, generator=gen) * 0.1).half()
    x = torch.randn(4, 64, 1024, generator=gen).to(dtype)
    monkeypatch.setattr(gblm_method, "gblm_prune_", _refuse)
    monkeypatch.setattr(score_mask, "_reference_score_and_mask", _refuse)
    got, norms, extra = prune_with("auto", weight.cuda(), grad.cuda(), x.cuda(), config)
    assert extra == {"backend": "triton"}
    expected = gblm_mask(weight, norms.cpu(), grad, config)
    assert torch.equal(got.cpu() == 0, expected | (weight == 0))
