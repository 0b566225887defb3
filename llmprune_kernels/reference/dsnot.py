"""DSnoT (Zhang et al. 2023, "Dynamic Sparse No Training"): the plain per-row reference of the mask refinement.

After a method pruned ``dense`` (W) to ``pruned`` (W'), DSnoT swaps pruned and kept weights within each output
row, without training, to shrink the row's expected reconstruction error

    e_i = sum_j (W_ij - W'_ij) * s_j,        s_j = E_seq[sum_t x_tj]   (``ActMoments.seq_sum``)

the expected change of output i over one calibration sequence. Regrowing a pruned j (W'_ij := W_ij) moves e by
``-W_ij s_j``; pruning a kept j (W'_ij := 0) by ``+W'_ij s_j``. Each cycle, in every row with |e| above
``update_threshold``:

* regrow: among the pruned weights whose ``W_ij s_j`` has the sign of e, the one with the largest
  ``|W_ij s_j| / Var(x_j) ** pow_of_var_regrowing``;
* prune (unstructured): among the kept weights whose ``W'_ij s_j`` has the opposite sign, the one with the
  lowest Wanda score ``|W'_ij| * sqrt(E||x_j||^2)``; N:M: the kept weight of the regrown weight's group of M
  with the lowest Wanda score, whatever its sign, so every group keeps its count;
* ``same_sign`` (default: N:M only, as the original code) refuses a swap that flips the error's sign.

A row stops for good at the first cycle whose swap is refused, whose error is within the threshold, or whose
candidates are used up, and after ``max_cycles``. Each weight moves at most once (a regrown weight is never
pruned again, nor a newly pruned one regrown), so every row keeps its number of pruned weights exactly.
``keep_best``: the result is each row's visited mask with the smallest |e| (the first such), which never has
a larger |e| than the method's; without it, the last one, as the original code returns.

Differences from the original code (github.com/zyxxmu/DSnoT, ``prune_DSnoT``), all at its edges: candidates
must have a strictly signed contribution and a row stops when they run out (the original then reads past
them, e.g. regrows a kept weight); the Wanda score is that of the method's weights W', so the refinement
runs after any method (for Wanda and magnitude W' = W on the kept weights, the original's score; it uses the
initial method's own score for N:M); e is accumulated in fp64 (the original: fp32); Var is the variance over
all calibration tokens (the original averages per-batch variances). Ties go to the lower column.
"""
from __future__ import annotations

import torch

from llmprune_kernels.validation import SparsityConfig, check_config, check_nm, check_weight


def dsnot_terms(dense: torch.Tensor, pruned: torch.Tensor, seq_sum: torch.Tensor, var: torch.Tensor,
                norm_sq: torch.Tensor, pow_of_var_regrowing: float) -> dict[str, torch.Tensor]:
    """The per-weight quantities DSnoT reads (fp32, (rows, cols)) and each row's initial error (fp64, (rows,)).

    ``grow``: W s (what regrowing removes from e), ``cut``: W' s (what pruning adds), ``key``: the regrow rank
    W s / Var ** pow, ``score``: the Wanda score of W', ``error``: e.
    """
    w, wp = dense.detach().float(), pruned.detach().float()
    s = seq_sum.float().to(w.device)
    grow = w * s
    key = grow / var.float().to(w.device).pow(pow_of_var_regrowing) if pow_of_var_regrowing else grow
    return {"grow": grow, "cut": wp * s, "key": key, "score": wp.abs() * norm_sq.float().to(w.device).sqrt(),
            "error": ((w - wp) * s).double().sum(1)}


def check_dsnot_inputs(dense: torch.Tensor, pruned: torch.Tensor, seq_sum: torch.Tensor, var: torch.Tensor,
                       norm_sq: torch.Tensor, config: SparsityConfig, max_cycles: int,
                       update_threshold: float) -> SparsityConfig:
    check_weight(dense, "dense weight")
    check_weight(pruned, "pruned weight")
    if pruned.shape != dense.shape:
        raise ValueError(f"pruned weight has shape {tuple(pruned.shape)}, the dense weight {tuple(dense.shape)}")
    for t, what in ((seq_sum, "input sums"), (var, "input variances"), (norm_sq, "input norms")):
        if t.shape != (dense.shape[1],):
            raise ValueError(f"{what} have shape {tuple(t.shape)}, expected ({dense.shape[1]},)")
    config = check_config(config)
    if config.is_nm:
        check_nm(config.n, config.m, dense.shape[1])
    if isinstance(max_cycles, bool) or not isinstance(max_cycles, int) or max_cycles < 0:
        raise ValueError(f"DSnoT max_cycles={max_cycles!r} is invalid; allowed: an integer >= 0")
    if not update_threshold >= 0:
        raise ValueError(f"DSnoT update_threshold={update_threshold!r} is invalid; allowed: a number >= 0")
    return config


@torch.no_grad()
def dsnot_mask_reference(dense: torch.Tensor, pruned: torch.Tensor, seq_sum: torch.Tensor, var: torch.Tensor,
                         norm_sq: torch.Tensor, config: SparsityConfig, *, max_cycles: int = 50,
                         update_threshold: float = 0.1, pow_of_var_regrowing: float = 1.0,
                         same_sign: bool | None = None, keep_best: bool = True) -> torch.Tensor:
    """The refined mask (True = pruned) of ``pruned`` (W', its zeros the method's mask), row by row."""
    config = check_dsnot_inputs(dense, pruned, seq_sum, var, norm_sq, config, max_cycles, update_threshold)
    same_sign = config.is_nm if same_sign is None else same_sign
    terms = dsnot_terms(dense, pruned, seq_sum, var, norm_sq, pow_of_var_regrowing)
    mask = pruned.detach() == 0
    out = mask.clone()
    for i in range(mask.shape[0]):
        row = _refine_row(mask[i].tolist(), *(terms[k][i].tolist() for k in ("grow", "cut", "key", "score")),
                          float(terms["error"][i]), config, max_cycles, update_threshold, same_sign, keep_best)
        out[i] = torch.tensor(row, dtype=torch.bool)
    return out


def _refine_row(pruned, grow, cut, key, score, error, config, max_cycles, threshold, same_sign, keep_best):
    cols = range(len(pruned))
    grow_lists = {1: sorted((j for j in cols if pruned[j] and grow[j] > 0), key=lambda j: (-key[j], j)),
                  -1: sorted((j for j in cols if pruned[j] and grow[j] < 0), key=lambda j: (key[j], j))}
    cut_lists = {1: sorted((j for j in cols if not pruned[j] and cut[j] > 0), key=lambda j: (score[j], j)),
                 -1: sorted((j for j in cols if not pruned[j] and cut[j] < 0), key=lambda j: (score[j], j))}
    used_grow, used_cut = {1: 0, -1: 0}, {1: 0, -1: 0}
    prunable = [not p for p in pruned]
    swaps, best, nbest = [], abs(error), 0
    for _ in range(max_cycles):
        if not abs(error) > threshold:
            break
        sign = 1 if error > 0 else -1
        if used_grow[sign] == len(grow_lists[sign]):
            break
        r = grow_lists[sign][used_grow[sign]]
        if config.is_nm:
            start = r - r % config.m
            group = [j for j in range(start, start + config.m) if prunable[j]]
            if not group:
                break
            p = min(group, key=lambda j: (score[j], j))
        else:
            if used_cut[-sign] == len(cut_lists[-sign]):
                break
            p = cut_lists[-sign][used_cut[-sign]]
        after = error - grow[r] + cut[p]
        if same_sign and (after == 0 or (after > 0) != (error > 0)):
            break
        swaps.append((r, p))
        error = after
        used_grow[sign] += 1
        used_cut[-sign] += 1
        prunable[p] = False
        if abs(error) < best:
            best, nbest = abs(error), len(swaps)
    out = list(pruned)
    for r, p in swaps[:nbest if keep_best else len(swaps)]:
        out[r], out[p] = False, True
    return out


def refined_weight(dense: torch.Tensor, pruned: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """W' with the refined ``mask``: regrown weights take their dense values, newly pruned ones are zeroed."""
    out = torch.where(mask, torch.zeros((), dtype=pruned.dtype, device=pruned.device), pruned)
    regrown = (pruned == 0) & ~mask
    return torch.where(regrown, dense.to(pruned.dtype), out)
