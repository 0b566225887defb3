"""``threshold="published"``: magnitude and SparseGPT reproduce the original code bit for bit.

The originals are re-typed below in plain torch: the Wanda repository's ``prune_magnitude``
(locuslab/wanda lib/prune.py) and SparseGPT's ``fasterprune`` (IST-DASLab/sparsegpt sparsegpt.py), both
unstructured. ``threshold="exact"`` (the default) keeps the exact-count rule.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llmprune_kernels import SparsityConfig, get_method
from llmprune_kernels.methods import check_options
from llmprune_kernels.methods.magnitude import MagnitudePruner, magnitude_prune_fast_
from llmprune_kernels.ops import sparsegpt as ops
from llmprune_kernels.reference.magnitude import magnitude_mask
from llmprune_kernels.reference.sparsegpt import sparsegpt_prune


# ----------------------------------------------------------------------------------------- the originals
def wanda_prune_magnitude_mask(W: torch.Tensor, sparsity_ratio: float) -> torch.Tensor:
    """locuslab/wanda lib/prune.py ``prune_magnitude``, unstructured branch (``.cuda()`` / ``.cpu()`` dropped)."""
    W_metric = torch.abs(W)
    thresh = torch.sort(W_metric.flatten())[0][int(W.numel() * sparsity_ratio)]
    W_mask = W_metric <= thresh
    return W_mask


def original_fasterprune(W: torch.Tensor, H: torch.Tensor, sparsity: float, blocksize: int = 128,
                         percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """IST-DASLab/sparsegpt sparsegpt.py ``SparseGPT.fasterprune`` with prune_n == 0 (unstructured), returning
    the pruned weight and the mask (the original keeps no mask; it is collected here)."""
    W = W.clone().float()
    H = H.clone()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Losses = torch.zeros(rows)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    full_mask = torch.zeros(rows, columns, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
        thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
        mask1 = tmp <= thresh
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        full_mask[:, i1:i2] = mask1
        Losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, full_mask


# ----------------------------------------------------------------------------------------------- inputs
def weight(shape, ties: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # integer-valued: many equal magnitudes, the threshold among them
        return torch.randint(-4, 5, shape, generator=g).float()
    return torch.randn(shape, generator=g)


def hessian(columns: int, seed: int, dead: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    X = torch.randn(4 * columns, columns, generator=g)
    X[:, :dead] = 0  # dead inputs (H[i,i] == 0)
    return 2 / X.shape[0] * X.t() @ X


SHAPES = [(16, 64), (24, 200), (8, 256)]
SPARSITIES = [0.5, 0.3, 0.75]


# ------------------------------------------------------------------------------------------- magnitude
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_magnitude_published_is_the_wanda_repo_mask(shape, ties, sparsity):
    W = weight(shape, ties, seed=shape[1])
    expected = wanda_prune_magnitude_mask(W, sparsity)
    config = SparsityConfig(sparsity)
    assert torch.equal(magnitude_mask(W, config, "published"), expected)
    fast = W.clone()
    assert torch.equal(magnitude_prune_fast_(fast, config, "published"), expected)
    assert torch.equal(fast, W.masked_fill(expected, 0))


def test_magnitude_published_nan_and_inf_as_the_original():
    W = weight((8, 32), True, seed=3)
    W[0, 0], W[1, 1], W[2, 2] = float("nan"), float("inf"), float("-inf")
    assert torch.equal(magnitude_mask(W, SparsityConfig(0.5), "published"), wanda_prune_magnitude_mask(W, 0.5))


def test_magnitude_exact_is_the_default_and_unchanged():
    W = weight((16, 64), True, seed=1)
    config = SparsityConfig(0.5)
    k = math.floor(W.numel() * 0.5)
    exact = magnitude_mask(W, config)
    assert torch.equal(exact, magnitude_mask(W, config, "exact")) and int(exact.sum()) == k
    order = torch.sort(W.abs().flatten(), stable=True).indices[:k]  # project rule: stable sort, first k
    assert torch.equal(exact.flatten().nonzero().flatten(), order.sort().values)
    published = magnitude_mask(W, config, "published")
    assert int(published.sum()) > k + 1  # the threshold's ties are all pruned
    assert bool((published | ~exact).all())  # published prunes a superset
    assert check_options("magnitude", None).threshold == "exact"


def test_magnitude_pruner_option():
    for threshold in ("exact", "published"):
        layer = nn.Linear(64, 16, bias=False)
        layer.weight.data = weight((16, 64), True, seed=5)
        W = layer.weight.data.clone()
        pruner = MagnitudePruner(layer, SparsityConfig(0.5), check_options("magnitude", {"threshold": threshold}))
        pruner.prune()
        assert torch.equal(layer.weight.data == 0, magnitude_mask(W, SparsityConfig(0.5), threshold) | (W == 0))
    with pytest.raises(ValueError, match="threshold='paper'"):
        check_options("magnitude", {"threshold": "paper"})


def test_nm_unchanged_by_the_convention():
    W = weight((16, 64), True, seed=7)
    config = SparsityConfig(n=2, m=4)
    assert torch.equal(magnitude_mask(W, config, "published"), magnitude_mask(W, config))


# ------------------------------------------------------------------------------------------- SparseGPT
@pytest.mark.parametrize("shape,blocksize", [((16, 64), 128), ((24, 200), 64), ((8, 256), 128)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_sparsegpt_published_is_fasterprune(shape, blocksize, ties, sparsity):
    W = weight(shape, ties, seed=shape[0] + shape[1])
    H = hessian(shape[1], seed=shape[1], dead=2)
    W_orig, mask_orig = original_fasterprune(W, H, sparsity, blocksize)
    res = sparsegpt_prune(W, H, SparsityConfig(sparsity), blocksize, threshold="published")
    assert torch.equal(res.mask, mask_orig)
    # Same fp32 ops on the same inputs, except the lazy update (one fused addmm_ here, matmul then subtract
    # in the original): a rounding apart at most.
    torch.testing.assert_close(res.weight, W_orig, rtol=1e-5, atol=1e-5)
    # Through the dispatcher ('auto' routes 'published' to the reference): the same bits.
    via_ops, used = ops.sparsegpt_prune(W, H, SparsityConfig(sparsity), blocksize, threshold="published")
    assert used == "reference" and torch.equal(via_ops.weight, res.weight) and torch.equal(via_ops.mask, res.mask)


def test_sparsegpt_exact_unchanged_and_published_prunes_more_with_ties():
    W = weight((16, 128), True, seed=11)
    H = hessian(128, seed=11)
    config = SparsityConfig(0.5)
    default = sparsegpt_prune(W, H, config)
    exact = sparsegpt_prune(W, H, config, threshold="exact")
    assert torch.equal(default.weight, exact.weight) and torch.equal(default.mask, exact.mask)
    assert int(exact.mask.sum()) == 16 * 128 // 2
    published = sparsegpt_prune(W, H, config, threshold="published")
    assert int(published.mask.sum()) > 16 * 128 // 2
    assert check_options("sparsegpt", None).threshold == "exact"


def test_sparsegpt_published_backend_rules():
    W, H = weight((8, 64), False, seed=2), hessian(64, seed=2)
    with pytest.raises(ValueError, match="reference only"):
        ops.sparsegpt_prune(W, H, SparsityConfig(0.5), threshold="published", backend="ext")
    with pytest.raises(ValueError, match="threshold 'paper' is invalid"):
        sparsegpt_prune(W, H, SparsityConfig(0.5), threshold="paper")
    layer = nn.Linear(64, 8, bias=False)
    opts = check_options("sparsegpt", {"threshold": "published"})
    assert get_method("sparsegpt")(layer, SparsityConfig(0.5), opts).backend == "reference"
