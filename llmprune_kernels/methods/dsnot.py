"""DSnoT mask refinement, all rows at once (torch ops: CUDA or CPU), and its options.

``dsnot_mask`` equals ``reference.dsnot.dsnot_mask_reference`` (the algorithm and its differences from the
original code are described there): the candidate lists of every row are sorted once, then each cycle takes
one regrow and one prune candidate per row by gathers, so a cycle costs O(rows) whatever the width and the
whole refinement at most ``max_cycles`` of them after four row sorts. Swaps are recorded per cycle and the
kept prefix of each row (``keep_best``) applied at the end.

It runs after any per-Linear method as the refinement ``dsnot`` (``methods.refine``: method ``"wanda+dsnot"``,
CLI ``--refine dsnot``), reading the inputs' ``ActMoments`` (``methods.statistics``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from llmprune_kernels.methods.base import option
from llmprune_kernels.methods.statistics import ActMoments
from llmprune_kernels.reference.dsnot import check_dsnot_inputs, dsnot_terms, refined_weight
from llmprune_kernels.validation import SparsityConfig

__all__ = ["DSnoTOptions", "DSnoTResult", "dsnot_mask", "dsnot_refine_"]


@dataclass(frozen=True)
class DSnoTOptions:
    """Options of the ``dsnot`` refinement (defaults: the original code's)."""

    dsnot_max_cycles: int = option(50, "grow/prune swaps tried per output row at most (original: max_cycle_time)")
    dsnot_update_threshold: float = option(
        0.1, "a row stops once its |expected error| (over one calibration sequence) is at most this")
    dsnot_pow_of_var_regrowing: float = option(
        1.0, "regrow the pruned weight with the largest |W E[x]| / Var(x) ** this (0: no variance term)")
    dsnot_same_sign: bool | None = option(
        None, "refuse a swap that flips the error's sign; None: for N:M only, as the original code")
    dsnot_keep_best: bool = option(
        True, "each row's visited mask with the smallest |error|; False: the last one, as the original code")
    dsnot_skip: str = option(
        "mlp", "comma-separated Linear name parts (e.g. 'mlp', 'q_proj') left as the method pruned them, as "
               "the original code's skip_layer; '' refines every Linear")

    def validate(self) -> None:
        if self.dsnot_max_cycles < 0:
            raise ValueError(f"DSnoT dsnot_max_cycles={self.dsnot_max_cycles} is invalid; allowed: an integer >= 0")
        if not self.dsnot_update_threshold >= 0:
            raise ValueError(f"DSnoT dsnot_update_threshold={self.dsnot_update_threshold} is invalid; "
                             "allowed: a number >= 0")

    def skips(self, layer_name: str) -> bool:
        """Whether the Linear ``layer_name`` (dotted) has one of the ``dsnot_skip`` parts."""
        skip = {p.strip() for p in self.dsnot_skip.split(",") if p.strip()}
        return bool(skip.intersection(layer_name.split(".")))

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``dsnot_mask`` / ``dsnot_mask_reference``."""
        return {"max_cycles": self.dsnot_max_cycles, "update_threshold": self.dsnot_update_threshold,
                "pow_of_var_regrowing": self.dsnot_pow_of_var_regrowing, "same_sign": self.dsnot_same_sign,
                "keep_best": self.dsnot_keep_best}


class DSnoTResult(NamedTuple):
    """The refined mask (True = pruned), the swaps kept per row, and each row's |e| before and after (fp64)."""

    mask: torch.Tensor
    swaps: torch.Tensor
    error_before: torch.Tensor
    error_after: torch.Tensor


def _ordered(valid: torch.Tensor, key: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first ``width`` columns of ``valid`` by ascending ``key`` (ties: lower column), and their count.

    Invalid entries get NaN, which a sort puts after every number (infinities included)."""
    keyed = torch.where(valid, key, torch.full((), float("nan"), device=key.device))
    order = torch.sort(keyed, dim=1, stable=True).indices[:, :width].contiguous()  # frees the full sort
    return order, valid.sum(1)


def _take(lists: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    return lists.gather(1, used.clamp(max=lists.shape[1] - 1)[:, None])[:, 0]


@torch.no_grad()
def dsnot_mask(dense: torch.Tensor, pruned: torch.Tensor, seq_sum: torch.Tensor, var: torch.Tensor,
               norm_sq: torch.Tensor, config: SparsityConfig, *, max_cycles: int = 50,
               update_threshold: float = 0.1, pow_of_var_regrowing: float = 1.0, same_sign: bool | None = None,
               keep_best: bool = True) -> DSnoTResult:
    """DSnoT's refined mask of ``pruned`` (W', zeros = the method's mask) for every row at once."""
    config = check_dsnot_inputs(dense, pruned, seq_sum, var, norm_sq, config, max_cycles, update_threshold)
    same_sign = config.is_nm if same_sign is None else same_sign
    t = dsnot_terms(dense, pruned, seq_sum, var, norm_sq, pow_of_var_regrowing)
    grow, cut, score, error = t["grow"], t["cut"], t["score"], t["error"]
    mask0 = pruned.detach() == 0
    rows, cols = mask0.shape
    dev = mask0.device
    width = max(1, min(max_cycles, cols))
    # candidate lists, by the sign of the error they serve: regrow +/- (largest |key| first), prune +/- (Wanda)
    grow_pos, n_grow_pos = _ordered(mask0 & (grow > 0), -t["key"], width)
    grow_neg, n_grow_neg = _ordered(mask0 & (grow < 0), t["key"], width)
    if not config.is_nm:
        cut_pos, n_cut_pos = _ordered(~mask0 & (cut > 0), score, width)
        cut_neg, n_cut_neg = _ordered(~mask0 & (cut < 0), score, width)
    else:  # the Wanda score of each weight still prunable; +inf: pruned, regrown or already swapped out
        live_score = torch.where(mask0, torch.full((), float("inf"), device=dev), score)
        offsets = torch.arange(config.m, device=dev)
    zero = torch.zeros(rows, dtype=torch.long, device=dev)
    used = {"grow_pos": zero, "grow_neg": zero.clone(), "cut_pos": zero.clone(), "cut_neg": zero.clone()}
    active = torch.ones(rows, dtype=torch.bool, device=dev)
    best, nbest, nswaps = error.abs(), zero.clone(), zero.clone()
    regrow = torch.zeros(rows, max_cycles, dtype=torch.long, device=dev)
    prune = torch.zeros_like(regrow)
    cycles = 0
    for cycle in range(max_cycles):
        pos = error > 0
        live = active & (error.abs() > update_threshold)
        live &= torch.where(pos, used["grow_pos"] < n_grow_pos, used["grow_neg"] < n_grow_neg)
        r = torch.where(pos, _take(grow_pos, used["grow_pos"]), _take(grow_neg, used["grow_neg"]))
        if config.is_nm:
            start = r - r % config.m
            group = live_score.gather(1, start[:, None] + offsets)
            at = group.argmin(1)  # the first (lowest) column among equal scores
            p = start + at
            live &= group.gather(1, at[:, None])[:, 0] < float("inf")
        else:
            live &= torch.where(pos, used["cut_neg"] < n_cut_neg, used["cut_pos"] < n_cut_pos)
            p = torch.where(pos, _take(cut_neg, used["cut_neg"]), _take(cut_pos, used["cut_pos"]))
        after = error - grow.gather(1, r[:, None])[:, 0].double() + cut.gather(1, p[:, None])[:, 0].double()
        if same_sign:
            live &= (after != 0) & ((after > 0) == pos)
        if not bool(live.any()):
            break
        cycles = cycle + 1
        error = torch.where(live, after, error)
        regrow[:, cycle], prune[:, cycle] = r, p
        nswaps += live
        for name, side in (("grow_pos", pos), ("grow_neg", ~pos), ("cut_neg", pos), ("cut_pos", ~pos)):
            used[name] = used[name] + (live & side)
        if config.is_nm:
            kept = live_score.gather(1, p[:, None])
            live_score.scatter_(1, p[:, None], torch.where(live[:, None], float("inf"), kept))
        better = live & (error.abs() < best)
        best = torch.where(better, error.abs(), best)
        nbest = torch.where(better, nswaps, nbest)
        active = live
    keep = nbest if keep_best else nswaps
    applied = torch.arange(cycles, device=dev)[None, :] < keep[:, None]
    row_of = torch.arange(rows, device=dev)[:, None].expand(rows, cycles)[applied]
    mask = mask0.clone()
    mask[row_of, regrow[:, :cycles][applied]] = False
    mask[row_of, prune[:, :cycles][applied]] = True
    return DSnoTResult(mask, keep, t["error"].abs(), best if keep_best else error.abs())


@torch.no_grad()
def dsnot_refine_(layer: nn.Module, dense: torch.Tensor, moments: ActMoments, config: SparsityConfig,
                  options: DSnoTOptions) -> dict[str, Any]:
    """Refine ``layer``'s pruned weight in place (``dense``: its weight before the method ran); report fields."""
    w = layer.weight.data
    res = dsnot_mask(dense, w, moments.seq_sum, moments.var, moments.norm_sq, config, **options.kwargs())
    w.copy_(refined_weight(dense, w, res.mask))
    before, after = float(res.error_before.mean()), float(res.error_after.mean())
    return {"dsnot_swaps": int(res.swaps.sum()), "dsnot_rows_changed": int((res.swaps > 0).sum()),
            "dsnot_error_before": before if math.isfinite(before) else None,
            "dsnot_error_after": after if math.isfinite(after) else None}
