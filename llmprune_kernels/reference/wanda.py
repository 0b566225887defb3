"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs").

Score S_ij = |W_ij| * ||X_j||_2, where ||X_j||_2^2 is the running mean over calibration sequences of
the squared L2 norm of input channel j (fp32). Unstructured: the k = floor(in * s) lowest scores of
each output row are pruned; N:M: the N lowest of every M consecutive input columns.
"""
from __future__ import annotations

import math

import torch

from llmprune_kernels.selection import prune_lowest_per_row, prune_nm
from llmprune_kernels.validation import (SparsityConfig, calibration_batch, check_act_norms, check_config, check_nm,
                                         check_weight)


class ActNormStats:
    """Running mean of squared input-channel L2 norms, as Wanda's ``WrappedGPT.add_batch``.

    ``add_batch(x)`` takes (batch, seq, in) or (tokens, in) activations; each leading batch entry
    counts as one calibration sequence (a 2-D input counts as one).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.in_features = in_features
        self.scaler_row = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor, name: str = "activations") -> None:
        x, batch = calibration_batch(inp, self.in_features, name)
        x = x.float()
        self.scaler_row *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        self.scaler_row += torch.linalg.vector_norm(x, ord=2, dim=0) ** 2 / self.nsamples


def wanda_score(weight: torch.Tensor, act_norm_sq: torch.Tensor) -> torch.Tensor:
    """Wanda score |W| * sqrt(mean squared input norm), in fp32."""
    return weight.detach().abs().float() * torch.sqrt(act_norm_sq.float()).reshape(1, -1)


def mask_from_score(score: torch.Tensor, config: SparsityConfig) -> torch.Tensor:
    """Per-row unstructured or N:M mask (True = pruned) of a score matrix, with the tie rule."""
    if config.is_nm:
        check_nm(config.n, config.m, score.shape[1])
        return prune_nm(score, config.n, config.m)
    return prune_lowest_per_row(score, math.floor(score.shape[1] * config.sparsity))


def wanda_mask(weight: torch.Tensor, act_norm_sq: torch.Tensor, config: SparsityConfig) -> torch.Tensor:
    """Boolean mask (True = pruned) of Wanda pruning."""
    check_weight(weight)
    check_act_norms(weight, act_norm_sq)
    return mask_from_score(wanda_score(weight, act_norm_sq), config)


@torch.no_grad()
def wanda_prune_(weight: torch.Tensor, act_norm_sq: torch.Tensor, config: SparsityConfig) -> torch.Tensor:
    """Zero the Wanda-pruned weights in place; returns the mask. ``act_norm_sq`` must be finite and >= 0."""
    mask = wanda_mask(weight, act_norm_sq, check_config(config))
    weight[mask] = 0
    return mask
