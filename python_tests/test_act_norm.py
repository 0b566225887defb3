"""Triton activation-norm statistics against the reference ActNormStats (fp32 tolerance)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from llmprune_kernels.ops.act_norm import TritonActNormStats, act_norm_update_
from llmprune_kernels.reference.wanda import ActNormStats
from llmprune_kernels.ops.score_mask import triton_usable

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_usable(DEV), reason="Triton is not usable here")


def run_both(width, batches, dtype):
    ref, got = ActNormStats(width, device=DEV), TritonActNormStats(width, device=DEV)
    for x in batches:
        x = x.to(DEV, dtype)
        ref.add_batch(x)
        got.add_batch(x)
        assert got.nsamples == ref.nsamples
        torch.testing.assert_close(got.scaler_row, ref.scaler_row, rtol=2e-6, atol=0)
    assert got.scaler_row.dtype == torch.float32
    return ref, got


@pytest.mark.parametrize("width", [13, 576, 1536])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_running_mean_equals_reference(width, dtype):
    # 3-D (batch, seq, in) counts batch sequences; 2-D counts as one; odd token counts
    batches = [torch.randn(2, 37, width) * 3, torch.randn(45, width), torch.randn(1, 70, width) + 1]
    run_both(width, batches, dtype)


def test_forward_hook_drop_in():
    lin = nn.Linear(64, 8, device=DEV)
    ref, got = ActNormStats(64, device=DEV), TritonActNormStats(64, device=DEV)
    handles = [lin.register_forward_hook(lambda m, i, o, s=s: s.add_batch(i[0].detach())) for s in (ref, got)]
    for _ in range(3):
        lin(torch.randn(2, 9, 64, device=DEV))
    for h in handles:
        h.remove()
    assert got.nsamples == ref.nsamples == 6
    torch.testing.assert_close(got.scaler_row, ref.scaler_row, rtol=2e-6, atol=0)


def test_non_contiguous_input_and_function_form():
    stats, ref = ActNormStats(40, device=DEV), ActNormStats(40, device=DEV)
    x = torch.randn(40, 2, 25, device=DEV).permute(1, 2, 0)  # (2, 25, 40), last dim strided
    act_norm_update_(stats, x)
    ref.add_batch(x)
    torch.testing.assert_close(stats.scaler_row, ref.scaler_row, rtol=2e-6, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises_like_reference(bad):
    stats = TritonActNormStats(16, device=DEV)
    stats.add_batch(torch.randn(4, 16, device=DEV))
    before = stats.scaler_row.clone()
    x = torch.randn(4, 16, device=DEV)
    x[1, 3] = bad
    with pytest.raises(ValueError, match="layer.0.q_proj contains"):
        stats.add_batch(x, name="layer.0.q_proj")
    assert stats.nsamples == 1 and torch.equal(stats.scaler_row, before)  # not updated
    with pytest.raises(ValueError, match="width 15, expected in_features=16"):
        stats.add_batch(torch.randn(3, 15, device=DEV))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(4, 512, 4096), (1, 2048, 11008), (2048, 28672)])
def test_full_size_cuda(shape):
    run_both(shape[-1], [torch.randn(shape), torch.randn(shape) * 2], torch.float16)
