"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot").

Follows the authors' ``SparseGPT.add_batch`` / ``fasterprune`` (IST-DASLab/sparsegpt) step by step:

* Hessian ``H = (2/n) * sum_x x x^T`` over calibration sequences, kept as a running mean in fp32.
* Dead inputs (``H[i,i] == 0``): ``H[i,i] = 1`` and ``W[:, i] = 0``.
* Damping ``percdamp * mean(diag H)`` on the diagonal; ``Hinv`` = upper Cholesky factor of ``H^-1``.
* Columns in blocks of ``blocksize``; inside a block, one column at a time: prune, compute the error
  ``(w - q) / Hinv[i,i]``, and propagate it to the block's later columns; after the block, one GEMM
  ``W[:, i2:] -= Err @ Hinv[i1:i2, i2:]`` (the "lazy batch update").
* Unstructured: the mask of a block is chosen before its column loop from the scores ``w^2 / Hinv[i,i]^2``.
  N:M: at each group start (``i % M == 0``) from the weights as already updated by earlier columns.

Two deliberate differences from the authors' code, both so that results are exact and reproducible:

1. Selection uses the project tie rule (stable ascending sort, lower index pruned first). Unstructured picks
   exactly ``k = floor(numel_block * s)`` lowest scores of the block (row-major flat index) where the
   reference's ``score <= sorted[k]`` prunes k + 1 entries plus every tie of the threshold; N:M replaces
   ``torch.topk`` (unspecified order among ties) by the same stable rule.
2. When the Cholesky factorisation fails (not positive definite after damping, or a non-finite factor), the
   damping is retried ``max_retries`` times, multiplied by 10 each time (0 becomes 0.01), on the original H;
   the damping used and the number of retries are returned. When the first attempt succeeds this is
   exactly the published computation.

``threshold="published"`` drops difference 1 for unstructured sparsity: each block's mask is the authors'
``tmp <= sort(tmp.flatten())[int(tmp.numel() * sparsity)]`` (k + 1 pruned per block, plus every tie of the
threshold). N:M is unaffected (exactly N per group under both conventions).

TF32 is never enabled here: callers decide (the reference code switches it off globally).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmprune_kernels.selection import check_threshold, prune_at_or_below_kth, prune_lowest_global, prune_nm
from llmprune_kernels.validation import (SparsityConfig, calibration_batch, check_config, check_finite,
                                         check_max_retries, check_nm, check_weight)


class HessianStats:
    """Running ``H = (2/n) * sum x x^T`` in fp32, as the reference ``SparseGPT.add_batch``.

    ``add_batch(x)`` takes (batch, seq, in) or (tokens, in) activations; each leading batch entry counts
    as one calibration sequence (a 2-D input counts as one).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.in_features = in_features
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor, name: str = "activations") -> None:
        self.nsamples = accumulate_hessian(self.H, self.nsamples, inp, name)


@torch.no_grad()
def accumulate_hessian(H: torch.Tensor, nsamples: int, inp: torch.Tensor, name: str = "activations") -> int:
    """Add a batch to the running ``H = (2/n) * sum x x^T`` in place; returns the new sequence count n."""
    x, batch = calibration_batch(inp, H.shape[0], name)
    # Rescale the running sum so H stays the mean over all sequences seen so far.
    H *= nsamples / (nsamples + batch)
    nsamples += batch
    x = math.sqrt(2 / nsamples) * x.t().float()
    H += x.matmul(x.t())
    return nsamples


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # pruned and updated weight, in the input weight's dtype
    mask: torch.Tensor  # bool, True = pruned
    losses: torch.Tensor  # per output row: sum over columns of (w - q)^2 / Hinv[i,i]^2 / 2
    damp: float  # damping added to the diagonal (absolute)
    retries: int  # Cholesky retries with larger damping
    fast_inverse: bool = False  # the extension's fp64 one-factorisation inverse ran (ops.sparsegpt)

    @property
    def loss(self) -> float:
        return float(self.losses.sum())


def damped_inverse_factor(H: torch.Tensor, damp) -> torch.Tensor | None:
    """Upper Cholesky factor of ``(H + damp*I)^-1``, or None where that matrix is not positive definite."""
    Hd = H.clone()
    Hd.diagonal().add_(damp)
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if int(info) == 0 and bool(torch.isfinite(U).all()):
            return U
    return None


def inverse_hessian_factor(H: torch.Tensor, percdamp: float, max_retries: int = 4,
                           name: str = "layer") -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of ``(H + damp*I)^-1`` with ``damp = percdamp * mean(diag H)``; see module doc."""
    check_max_retries(max_retries)
    mean_diag = torch.mean(torch.diag(H))
    for attempt in range(max_retries + 1):
        damp = percdamp * mean_diag
        last = float(damp)
        U = damped_inverse_factor(H, damp)
        if U is not None:
            return U, float(damp), attempt
        percdamp = percdamp * 10 if percdamp > 0 else 0.01
    raise RuntimeError(
        f"{name}: Cholesky factorisation failed after {max_retries} retries with growing damping (last "
        f"damping {last:g}); the Hessian is not usable"
    )


def check_hessian(H: torch.Tensor, columns: int, name: str) -> None:
    if H.shape != (columns, columns):
        raise ValueError(f"{name}: Hessian has shape {tuple(H.shape)}, expected ({columns}, {columns})")
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"{name}: Hessian contains NaN or Inf values; pruning needs finite calibration inputs")


def check_finite_weight(weight: torch.Tensor, name: str) -> None:
    """SparseGPT needs a finite weight: a NaN would spread through the OBS updates of its row."""
    check_finite(weight, f"{name}: weight")


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    config: SparsityConfig,
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_retries: int = 4,
    name: str = "layer",
    compute_dtype: torch.dtype = torch.float32,
    threshold: str = "exact",
) -> SparseGPTResult:
    """SparseGPT ``fasterprune`` on ``weight`` (out, in) with Hessian ``H`` (in, in); inputs are not modified.

    ``compute_dtype``: fp32 as published; fp64 gives a near-exact-arithmetic oracle for judging how far
    fp32 implementations (this one included) round away from the algorithm's exact result.
    ``threshold``: ``exact`` (default) or ``published`` (the authors' per-block ``<=`` threshold; module doc)."""
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype {compute_dtype} not allowed (torch.float32, torch.float64)")
    check_weight(weight)
    config = check_config(config)
    check_max_retries(max_retries)
    check_threshold(threshold)
    rows, columns = weight.shape
    check_hessian(H, columns, name)
    check_finite_weight(weight, name)
    if config.is_nm:
        check_nm(config.n, config.m, columns)
        if blocksize % config.m:
            raise ValueError(f"blocksize {blocksize} must be a multiple of M={config.m} for N:M pruning")
    W = weight.detach().to(compute_dtype).contiguous().clone()
    H = H.to(compute_dtype).contiguous().clone()

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv, damp, retries = inverse_hessian_factor(H, percdamp, max_retries, name)
    del H

    mask = torch.zeros(rows, columns, dtype=torch.bool, device=W.device)
    losses = torch.zeros(rows, device=W.device, dtype=compute_dtype)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)

        if config.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            score = W1**2 / d1.reshape(1, -1) ** 2
            k = math.floor(score.numel() * config.sparsity)
            if threshold == "published":  # every score <= the k-th smallest (0-based), as the authors' code
                mask1 = prune_at_or_below_kth(score, k)
            else:  # exactly k lowest scores of the block, ties by row-major flat index
                mask1 = prune_lowest_global(score, k)

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if config.is_nm and i % config.m == 0:
                # Chosen from the weights already updated by the block's earlier columns.
                score = W1[:, i : i + config.m] ** 2 / d1[i : i + config.m].reshape(1, -1) ** 2
                mask1[:, i : i + config.m] = prune_nm(score, config.n, config.m)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            # OBS update of the block's remaining columns (outer product, then subtract).
            W1[:, i:] -= torch.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        losses += torch.sum(Losses1, 1) / 2
        # Lazy batch update of all later columns: W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:] as one fused GEMM.
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)

    return SparseGPTResult(W.to(weight.dtype), mask, losses, damp, retries)
