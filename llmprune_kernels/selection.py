"""Mask selection with the project's single tie rule.

Tie rule (everywhere, kernels included): among equal scores the one with the LOWER column index is
pruned first. Equivalently: stable ascending sort of the scores, prune the first k. For the
matrix-wide magnitude threshold, "column index" is the row-major flat index.
Masks are boolean with True = pruned.

The one exception is the opt-in ``threshold="published"`` convention (``prune_at_or_below_kth``): the
original Wanda / SparseGPT code's ``score <= sort(score)[k]``, which prunes k + 1 entries plus every tie of
the threshold and needs no tie rule.
"""
from __future__ import annotations

import torch


def prune_lowest_per_row(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest scores in each row (ties: lower column index pruned first)."""
    rows, cols = score.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=score.device)
    if k <= 0:
        return mask
    idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
    return mask.scatter_(1, idx, True)


def prune_lowest_global(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest scores of the whole matrix (ties: lower row-major index first)."""
    flat = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        idx = torch.sort(score.flatten(), stable=True).indices[:k]
        flat[idx] = True
    return flat.view_as(score)


THRESHOLDS = ("exact", "published")


def check_threshold(threshold: object) -> str:
    """``exact`` (the default: exactly k pruned, project tie rule) or ``published`` (the original code's rule)."""
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold {threshold!r} is invalid; allowed: 'exact', 'published'")
    return threshold


def prune_at_or_below_kth(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of every score ``<=`` the (0-based) k-th smallest of the whole matrix, as the original code's
    ``score <= torch.sort(score.flatten())[0][k]``: k + 1 entries, more when the threshold has ties (NaN is
    never pruned). ``k >= numel`` (no such element) prunes everything."""
    flat = score.flatten()
    if k >= flat.numel():
        return torch.ones_like(score, dtype=torch.bool)
    if bool(torch.isfinite(flat).all()):
        thresh = torch.kthvalue(flat, k + 1).values  # the same value as the sort's, without the full sort
    else:
        thresh = torch.sort(flat)[0][k]
    return score <= thresh


def prune_nm(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask pruning the ``n`` lowest of every ``m`` consecutive columns (ties: lower index first)."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    idx = torch.sort(groups, dim=2, stable=True).indices[:, :, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)
