"""Magnitude pruning (Han et al. 2015; the baseline of the Wanda / SparseGPT papers).

Unstructured: one threshold per weight matrix, i.e. the k = floor(numel * s) smallest |W| of the
whole matrix are pruned. N:M: the N smallest |W| of every M consecutive input columns.
"""
from __future__ import annotations

import math

import torch

from llmprune_kernels.selection import prune_lowest_global, prune_nm
from llmprune_kernels.validation import SparsityConfig, check_nm, check_weight


def magnitude_mask(weight: torch.Tensor, config: SparsityConfig) -> torch.Tensor:
    """Boolean mask (True = pruned) of magnitude pruning."""
    check_weight(weight)
    score = weight.detach().abs().float()
    if config.is_nm:
        check_nm(config.n, config.m, weight.shape[1])
        return prune_nm(score, config.n, config.m)
    return prune_lowest_global(score, math.floor(weight.numel() * config.sparsity))


@torch.no_grad()
def magnitude_prune_(weight: torch.Tensor, config: SparsityConfig) -> torch.Tensor:
    """Zero the magnitude-pruned weights in place; returns the mask."""
    mask = magnitude_mask(weight, config)
    weight[mask] = 0
    return mask
