"""Reference magnitude and Wanda pruners: invariants, hand-checked cases, the tie rule, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from llmprune_kernels import SparsityConfig
from llmprune_kernels.reference.magnitude import magnitude_mask, magnitude_prune_
from llmprune_kernels.reference.wanda import ActNormStats, wanda_mask, wanda_prune_
from llmprune_kernels.selection import prune_lowest_per_row, prune_nm


@pytest.mark.parametrize("shape", [(7, 13), (32, 64), (5, 576)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9])
def test_wanda_exact_zeros_per_row_and_kept_unchanged(shape, sparsity, device):
    w = torch.randn(shape, device=device)
    stats = ActNormStats(shape[1], device=device)
    for _ in range(3):
        stats.add_batch(torch.randn(2, 11, shape[1], device=device))
    orig = w.clone()
    mask = wanda_prune_(w, stats.scaler_row, SparsityConfig(sparsity))
    k = math.floor(shape[1] * sparsity)
    assert (mask.sum(1) == k).all()
    assert ((w == 0).sum(1) == k).all()
    assert torch.equal(w[~mask], orig[~mask])


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_exact_zeros_per_group(n, m, device):
    w = torch.randn(9, 8 * m, device=device)
    norms = torch.rand(8 * m, device=device)
    orig = w.clone()
    mask = wanda_prune_(w, norms, SparsityConfig(n=n, m=m))
    assert (mask.view(9, 8, m).sum(-1) == n).all()
    assert torch.equal(w[~mask], orig[~mask])
    w2 = orig.clone()
    mask2 = magnitude_prune_(w2, SparsityConfig(n=n, m=m))
    assert (mask2.view(9, 8, m).sum(-1) == n).all()
    assert torch.equal(w2[~mask2], orig[~mask2])


def test_magnitude_one_threshold_per_matrix():
    # Row 0 holds the four smallest magnitudes of the matrix: at 50% they all go, row 1 keeps all.
    w = torch.tensor([[0.1, -0.2, 0.3, 0.05], [1.0, -2.0, 3.0, 4.0]])
    mask = magnitude_mask(w, SparsityConfig(0.5))
    assert mask.tolist() == [[True, True, True, True], [False, False, False, False]]


def test_wanda_by_hand():
    # Scores |W| * sqrt(norm): row 0 -> [1*1, 2*0.5, 3*2, 0.5*4] = [1, 1, 6, 2]; tie between col 0 and 1.
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, 0.1, 1.0]])
    norm_sq = torch.tensor([1.0, 0.25, 4.0, 16.0])
    mask = wanda_mask(w, norm_sq, SparsityConfig(0.25))
    # Tie rule: equal scores, the lower column index is pruned first.
    assert mask.tolist() == [[True, False, False, False], [False, False, True, False]]
    mask = wanda_mask(w, norm_sq, SparsityConfig(0.5))
    # row 1 scores [4, 0.5, 0.2, 4]
    assert mask.tolist() == [[True, True, False, False], [False, True, True, False]]


def test_act_norm_stats_running_mean_matches_batch_formula():
    xs = [torch.randn(2, 5, 6) for _ in range(3)] + [torch.randn(1, 5, 6)]
    stats = ActNormStats(6)
    for x in xs:
        stats.add_batch(x)
    allx = torch.cat(xs, 0)  # 7 sequences
    expected = allx.pow(2).sum(dim=(0, 1)) / allx.shape[0]
    assert stats.nsamples == 7
    torch.testing.assert_close(stats.scaler_row, expected, rtol=1e-5, atol=1e-6)


def test_tie_rule_all_equal_and_all_zero_rows():
    score = torch.zeros(3, 8)
    assert prune_lowest_per_row(score, 3)[:, :3].all() and not prune_lowest_per_row(score, 3)[:, 3:].any()
    m = prune_nm(torch.ones(2, 8), 2, 4)
    assert m.tolist() == [[True, True, False, False] * 2] * 2


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        SparsityConfig(bad)


@pytest.mark.parametrize("n,m", [(4, 4), (5, 4), (0, 4)])
def test_bad_nm(n, m):
    with pytest.raises(ValueError, match=f"{n}:{m}"):
        SparsityConfig(n=n, m=m)


def test_nm_width_not_multiple():
    with pytest.raises(ValueError, match="multiple of 4, got width 10"):
        wanda_mask(torch.randn(3, 10), torch.ones(10), SparsityConfig(n=2, m=4))


def test_nan_activations_rejected():
    stats = ActNormStats(4)
    x = torch.randn(1, 3, 4)
    x[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        stats.add_batch(x, name="layers.0.mlp.up_proj inputs")


def test_bad_dtype_rejected():
    with pytest.raises(TypeError, match="int32"):
        magnitude_mask(torch.ones(2, 4, dtype=torch.int32), SparsityConfig(0.5))


def test_parse_pattern():
    assert SparsityConfig.parse(pattern="2:4") == SparsityConfig(n=2, m=4)
    with pytest.raises(ValueError, match="N:M"):
        SparsityConfig.parse(pattern="2-4")
