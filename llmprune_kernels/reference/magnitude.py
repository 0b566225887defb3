"""Magnitude pruning (Han et al. 2015; the baseline of the Wanda / SparseGPT papers).

Unstructured: one threshold per weight matrix, i.e. the k = floor(numel * s) smallest |W| of the
whole matrix are pruned. N:M: the N smallest |W| of every M consecutive input columns.

``threshold="published"`` reproduces the Wanda repository's ``prune_magnitude`` (locuslab/wanda
lib/prune.py) for unstructured sparsity: ``thresh = sort(|W|.flatten())[k]; mask = |W| <= thresh``, which
prunes k + 1 entries plus every tie of the threshold. N:M is the same under both conventions (exactly N per
group; the original's ``torch.topk`` leaves the order among ties unspecified, the project's rule fixes it).
"""
from __future__ import annotations

import math

import torch

from llmprune_kernels.selection import check_threshold, prune_at_or_below_kth, prune_lowest_global, prune_nm
from llmprune_kernels.validation import SparsityConfig, check_nm, check_weight


def magnitude_mask(weight: torch.Tensor, config: SparsityConfig, threshold: str = "exact") -> torch.Tensor:
    """Boolean mask (True = pruned) of magnitude pruning; ``threshold``: ``exact`` or ``published`` (module doc)."""
    check_weight(weight)
    check_threshold(threshold)
    score = weight.detach().abs().float()
    if config.is_nm:
        check_nm(config.n, config.m, weight.shape[1])
        return prune_nm(score, config.n, config.m)
    k = math.floor(weight.numel() * config.sparsity)
    if threshold == "published":
        return prune_at_or_below_kth(score, k)
    return prune_lowest_global(score, k)


@torch.no_grad()
def magnitude_prune_(weight: torch.Tensor, config: SparsityConfig, threshold: str = "exact") -> torch.Tensor:
    """Zero the magnitude-pruned weights in place; returns the mask."""
    mask = magnitude_mask(weight, config, threshold)
    weight[mask] = 0
    return mask
