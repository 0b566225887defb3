"""GBLM-Pruner (Das et al. 2023, "Beyond Size: How Gradients Shape Pruning Decisions in LLMs").

Score, as ``prune_gblm`` of the reference code (default, non-inverted gradient branch):

    S = |W| * sqrt(||X_j||^2)  +  |W| * |G|

where ||X_j||^2 is Wanda's running mean of squared input-channel norms (fp32) and G the gradient norm of
``llmprune_kernels.pipeline.gradients`` (sqrt of the summed squares of 100x-scaled per-sample gradients, stored in
fp16 by the reference). Precision follows the reference exactly: the Wanda term is fp32; the gradient
term is computed in torch's promoted dtype of W and G (so fp16 for an fp16 model with fp16 G, fp32 for an
fp32 model) and then cast to fp32 before the sum. Selection: the k = floor(in * s) lowest scores per
output row (unstructured) or the N lowest of every M consecutive inputs, with the project's tie rule.
With G = 0 the score is exactly Wanda's.
"""
from __future__ import annotations

import torch

from llmprune_kernels.reference.wanda import mask_from_score, wanda_score
from llmprune_kernels.validation import SparsityConfig, check_finite, check_finite_nonnegative, check_weight


def gblm_score(weight: torch.Tensor, act_norm_sq: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """GBLM score |W| * sqrt(norm) + |W| * |G|, in fp32 (gradient product in the promoted dtype, as the reference)."""
    w = weight.detach().abs()
    grad_term = w * grad_norm.detach().abs().to(w.device)
    return wanda_score(weight, act_norm_sq) + grad_term.float()


def _check_inputs(weight: torch.Tensor, act_norm_sq: torch.Tensor, grad_norm: torch.Tensor) -> None:
    check_weight(weight)
    if act_norm_sq.shape != (weight.shape[1],):
        raise ValueError(
            f"activation norms have shape {tuple(act_norm_sq.shape)}, expected ({weight.shape[1]},) for weight "
            f"{tuple(weight.shape)}"
        )
    if grad_norm.shape != weight.shape:
        raise ValueError(
            f"gradient norms have shape {tuple(grad_norm.shape)}, expected the weight's shape {tuple(weight.shape)}"
        )
    if not grad_norm.is_floating_point():
        raise TypeError(f"gradient norms have dtype {grad_norm.dtype}; allowed: a floating dtype")
    check_finite_nonnegative(act_norm_sq, "activation norms")
    check_finite(grad_norm, "gradient norms")


def gblm_mask(
    weight: torch.Tensor, act_norm_sq: torch.Tensor, grad_norm: torch.Tensor, config: SparsityConfig
) -> torch.Tensor:
    """Boolean mask (True = pruned) of GBLM-Pruner."""
    _check_inputs(weight, act_norm_sq, grad_norm)
    return mask_from_score(gblm_score(weight, act_norm_sq, grad_norm), config)


@torch.no_grad()
def gblm_prune_(
    weight: torch.Tensor, act_norm_sq: torch.Tensor, grad_norm: torch.Tensor, config: SparsityConfig
) -> torch.Tensor:
    """Zero the GBLM-pruned weights in place; returns the mask."""
    mask = gblm_mask(weight, act_norm_sq, grad_norm, config)
    weight[mask] = 0
    return mask
