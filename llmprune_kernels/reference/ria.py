"""RIA, relative importance and activations (Zhang et al. 2024, "Plug-and-Play: An Efficient Post-training
Pruning Method for Large Language Models").

Score, as the reference code (``prune_ria``):

    S_ij = (|W_ij| / sum_i |W_ij|  +  |W_ij| / sum_j |W_ij|) * (sqrt(||X_j||^2)) ** a,   a = 0.5

(the column sum over output rows first, then the row sum over inputs), in fp32 here. Selection is the
project's: per output row the k = floor(in * s) lowest, or the N lowest of every M consecutive inputs,
with the tie rule of ``llmprune_kernels.selection``. An all-zero row or column gives 0/0 = NaN scores,
which sort last (as ``torch.sort`` does).
"""
from __future__ import annotations

import torch

from llmprune_kernels.reference.wanda import mask_from_score
from llmprune_kernels.validation import SparsityConfig, check_act_norms, check_weight


def ria_factor(act_norm_sq: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Per-input-channel activation factor sqrt(norm) ** alpha (fp32)."""
    return torch.sqrt(act_norm_sq.float()) ** alpha


def ria_sums(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row sums, column sums) of |W| in fp32, computed exactly as ``ria_score`` does."""
    a = weight.detach().abs().float()
    return a.sum(dim=1), a.sum(dim=0)


def ria_score(weight: torch.Tensor, act_norm_sq: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """RIA score (|W|/colsum + |W|/rowsum) * sqrt(norm)**alpha, in fp32."""
    a = weight.detach().abs().float()
    row_sum, col_sum = ria_sums(weight)
    rel = a / col_sum.reshape(1, -1) + a / row_sum.reshape(-1, 1)
    return rel * ria_factor(act_norm_sq, alpha).reshape(1, -1)


def ria_mask(
    weight: torch.Tensor, act_norm_sq: torch.Tensor, config: SparsityConfig, alpha: float = 0.5
) -> torch.Tensor:
    """Boolean mask (True = pruned) of RIA pruning."""
    check_weight(weight)
    check_act_norms(weight, act_norm_sq)
    return mask_from_score(ria_score(weight, act_norm_sq, alpha), config)
