"""ADMM weight update with gradual mask selection (Boža 2024, "Fast and Optimal Weight Update for Pruned Large
Language Models"; the authors' code: fmfi-compbio/admm-pruning, ``AdmmPruner.fasterprune``).

Per Linear, with the calibration Hessian H (``statistic = "hessian"``, shared with SparseGPT's):

    minimise  (W' - W) Hd (W' - W)^T   subject to  W' = 0 on the mask,

solved by ADMM on the splitting W' = Z, all output rows at once. As in the authors' code:

* H is normalised to a unit diagonal (``Hn = D^-1 H D^-1``, ``D = sqrt(diag H)``) and the weights scaled
  by D, so ``|W_ij| D_j`` (Wanda's score) is the magnitude the mask reads and ρ is scale-free.
* Dampening ``Hd = Hn + percdamp * mean(diag Hn) * I`` (the package's convention, on the normalised H;
  it keeps a singular H usable). Dead inputs (``H[i,i] == 0``) get ``H[i,i] = 1`` and ``W[:, i] = 0``,
  as in SparseGPT.
* One fp32 Cholesky factorisation of ``Hd + ρ I`` per value of ρ; each iteration is then one GEMM,
  ``W = W0 + ρ (Z - U - W0) (Hd + ρI)^-1`` (the W-step ``(W0 Hd + ρ(Z - U)) (Hd + ρI)^-1`` rewritten),
  then ``Z = proj(W + U)`` and ``U += W - Z``.
* Gradual pruning: in iteration t < T (``prune_iterations``, 15 of 20) the mask is re-chosen from the
  scores ``|W + U|`` at sparsity ``s (1 - (1 - (t+1)/T)^3)``, reaching the target at t = T - 1, fixed after.
  Unstructured: the lowest scores of the whole matrix (``scope="matrix"``, the default, as the authors' code;
  it prunes at the full sparsity from the first iteration there, this one gradually), or of each output row
  (``"row"``, the authors' ``per_out``). N:M: the N lowest of every M are the candidates, and the lowest-scoring
  candidates of the whole matrix are pruned (all of them from t = T - 1 on), as the authors' code.
* The result is the last projection Z (exactly zero on the mask), scaled back by D^-1.

Selection uses the package's tie rule (``selection``: stable sort, the lower index pruned first), so the
same inputs give the same mask. Options beyond the paper (off by default): ρ growing geometrically
(``rho_growth``, refactorising each time; the scaled dual U is rescaled so the iterate stays the same), and
a conjugate-gradient polish that solves the least-squares problem on the final support (``polish``).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from llmprune_kernels.methods.base import LayerPruner, check_options, option, register_method
from llmprune_kernels.reference.sparsegpt import check_finite_weight, check_hessian
from llmprune_kernels.selection import prune_lowest_global, prune_lowest_per_row, prune_nm
from llmprune_kernels.validation import SparsityConfig, check_config, check_nm, check_weight

SCOPES = ("row", "matrix")


@dataclass(frozen=True)
class ADMMOptions:
    """Options of ``admm`` (defaults: the authors' code)."""

    iterations: int = option(20, "ADMM iterations (one GEMM of the weight by the inverse each)")
    prune_iterations: int | None = option(None, "iterations over which the sparsity rises cubically to its target, "
                                                "the mask re-chosen from |W + U| in each; None: ceil(3/4 iterations) "
                                                "(15 of 20, as the paper); 0: the dense weights' mask, fixed")
    rho: float = option(1.0, "ADMM penalty ρ, relative to the unit diagonal of the normalised Hessian")
    rho_growth: float = option(1.0, "ρ is multiplied by this every rho_every iterations (one new factorisation "
                                    "each); 1: fixed ρ, as the paper")
    rho_every: int = option(3, "iterations between ρ updates when rho_growth > 1")
    percdamp: float = option(0.1, "dampening added to the normalised Hessian's diagonal, as a fraction of its mean")
    max_retries: int = option(4, "Cholesky retries, each with 10x the dampening")
    polish: int = option(0, "conjugate-gradient steps on the final support after ADMM, batched over rows "
                            "(0: none, as the paper)")
    scope: Literal[SCOPES] = option("matrix", "unstructured: 'matrix' prunes the lowest scores of the whole matrix "
                                              "(the authors' default), 'row' the same count in every output row")

    def validate(self) -> None:
        checks = [
            ("iterations", self.iterations >= 1, "an integer >= 1"),
            ("prune_iterations", self.prune_iterations is None or 0 <= self.prune_iterations <= self.iterations,
             f"None or an integer from 0 to iterations ({self.iterations})"),
            ("rho", self.rho > 0, "a finite number > 0"),
            ("rho_growth", self.rho_growth >= 1, "a finite number >= 1"),
            ("rho_every", self.rho_every >= 1, "an integer >= 1"),
            ("percdamp", self.percdamp >= 0, "a finite number >= 0"),
            ("max_retries", self.max_retries >= 0, "an integer >= 0"),
            ("polish", self.polish >= 0, "an integer >= 0"),
        ]
        if self.scope not in SCOPES:
            raise ValueError(f"ADMM scope={self.scope!r} is invalid; allowed: 'row', 'matrix'")
        for key, ok, allowed in checks:
            if not ok:
                raise ValueError(f"ADMM {key}={getattr(self, key)!r} is invalid; allowed: {allowed}")

    @property
    def gradual_iterations(self) -> int:
        """``prune_iterations``, None resolved to ceil(3/4 iterations)."""
        return (3 * self.iterations + 3) // 4 if self.prune_iterations is None else self.prune_iterations


@dataclass
class ADMMResult:
    weight: torch.Tensor  # pruned and updated weight, in the input weight's dtype
    mask: torch.Tensor  # bool, True = pruned
    loss: float  # relative reconstruction error on the calibration Hessian: sqrt(tr(E H E^T) / tr(W H W^T))
    damp: float  # dampening added to the normalised Hessian's diagonal (absolute)
    retries: int  # Cholesky retries with larger dampening (summed over the factorisations)
    rho: float  # the last ρ
    factorisations: int


def gradual_sparsity(sparsity: float, t: int, prune_iterations: int) -> float:
    """The paper's cubic schedule: the sparsity of iteration ``t`` (0-based), ``sparsity`` from t = T - 1 on."""
    if t >= prune_iterations - 1:
        return sparsity
    return sparsity - sparsity * (1 - (t + 1) / prune_iterations) ** 3


def select_mask(score: torch.Tensor, config: SparsityConfig, sparsity: float, scope: str = "row") -> torch.Tensor:
    """Mask (True = pruned) of ``score`` at ``sparsity`` on the way to ``config`` (its own sparsity: the target).

    Unstructured: ``floor(cols * sparsity)`` lowest per row (``scope="row"``) or ``floor(numel * sparsity)``
    lowest of the matrix (``"matrix"``). N:M: of the N lowest of every M, the ``floor(numel * sparsity)``
    lowest of the matrix (all N per group at the target)."""
    if not config.is_nm:
        if scope == "matrix":
            return prune_lowest_global(score, math.floor(score.numel() * sparsity))
        return prune_lowest_per_row(score, math.floor(score.shape[1] * sparsity))
    candidates = prune_nm(score, config.n, config.m)
    if sparsity >= config.sparsity:
        return candidates
    return prune_lowest_global(score.masked_fill(~candidates, math.inf), math.floor(score.numel() * sparsity))


def _inverse_shifted(Hd: torch.Tensor, rho: float) -> torch.Tensor | None:
    """``(Hd + rho I)^-1`` from an fp32 Cholesky factor; None where the factorisation fails or is not finite."""
    A = Hd.clone()
    A.diagonal().add_(rho)
    L, info = torch.linalg.cholesky_ex(A)
    del A
    if int(info) != 0 or not bool(torch.isfinite(L).all()):
        return None
    return torch.cholesky_inverse(L)


def _factor(Hn: torch.Tensor, damp: float, rho: float, max_retries: int,
            name: str) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """``Hd = Hn + damp I`` (in place of Hn) and ``(Hd + rho I)^-1``. On failure the dampening grows 10x
    (0 becomes 0.01), up to ``max_retries`` times. Returns Hd, the inverse, the dampening and the retries."""
    added = 0.0
    for attempt in range(max_retries + 1):
        Hn.diagonal().add_(damp - added)
        added = damp
        Ainv = _inverse_shifted(Hn, rho)
        if Ainv is not None:
            return Hn, Ainv, damp, attempt
        damp = damp * 10 if damp > 0 else 0.01
    raise RuntimeError(f"{name}: Cholesky factorisation of the ADMM system failed after {max_retries} retries with "
                       f"growing dampening (last {added:g}, rho {rho:g}); the Hessian is not usable")


def _cg_polish(W: torch.Tensor, W0: torch.Tensor, Hd: torch.Tensor, keep: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` of conjugate gradients on ``(W - W0) Hd (W - W0)^T`` over the kept entries, every row at once."""
    W = W.clone()
    R = ((W0 - W) @ Hd).mul_(keep)  # minus the gradient, on the support
    P = R.clone()
    rr = (R * R).sum(1)
    for _ in range(steps):
        AP = (P @ Hd).mul_(keep)
        pap = (P * AP).sum(1)
        alpha = torch.where(pap > 0, rr / pap.clamp_min(torch.finfo(pap.dtype).tiny), torch.zeros_like(rr))
        W.addcmul_(alpha[:, None], P)
        R.addcmul_(alpha[:, None], AP, value=-1)
        rr_new = (R * R).sum(1)
        beta = torch.where(rr > 0, rr_new / rr.clamp_min(torch.finfo(rr.dtype).tiny), torch.zeros_like(rr))
        P = R.addcmul(beta[:, None], P)
        rr = rr_new
    return W


@torch.no_grad()
def admm_prune(weight: torch.Tensor, H: torch.Tensor, config: SparsityConfig, options: Any = None, *,
               mask: torch.Tensor | None = None, name: str = "layer", **kwargs: Any) -> ADMMResult:
    """ADMM pruning of ``weight`` (out, in) with Hessian ``H`` (in, in); inputs are not modified (module doc).

    ``options``: ``ADMMOptions`` or a mapping; keyword arguments are options too (checked as the CLI's).
    ``mask`` (bool, True = pruned): a fixed support instead of the gradual selection."""
    o = check_options(ADMMPruner, {**dataclasses.asdict(check_options(ADMMPruner, options)), **kwargs}
                      if kwargs else options)
    rho, prune_iterations = o.rho, o.gradual_iterations
    check_weight(weight)
    config = check_config(config)
    columns = weight.shape[1]
    check_hessian(H, columns, name)
    check_finite_weight(weight, name)
    if config.is_nm:
        check_nm(config.n, config.m, columns)
    if mask is not None and (mask.shape != weight.shape or mask.dtype != torch.bool):
        raise ValueError(f"{name}: mask must be bool of shape {tuple(weight.shape)}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    W0 = weight.detach().to(torch.float32).clone()
    Hn = H.detach().to(device=W0.device, dtype=torch.float32).clone()
    dead = Hn.diagonal() == 0
    Hn[dead, dead] = 1
    W0[:, dead] = 0
    d = Hn.diagonal().sqrt()
    Hn.div_(d[:, None]).div_(d[None, :])
    W0.mul_(d[None, :])  # the normalised weights: |W0| is Wanda's score
    Hd, Ainv, damp, retries = _factor(Hn, float(o.percdamp * Hn.diagonal().mean()), rho, o.max_retries, name)
    factorisations = 1
    W, U = W0.clone(), torch.zeros_like(W0)
    fixed = mask is not None
    cur = mask.to(W0.device) if fixed else select_mask(W0.abs(), config, config.sparsity, o.scope)
    for t in range(o.iterations):
        if not fixed and t < prune_iterations:
            cur = select_mask((W + U).abs(), config, gradual_sparsity(config.sparsity, t, prune_iterations),
                              o.scope)
        Z = (W + U).masked_fill_(cur, 0)
        U.add_(W).sub_(Z)
        if o.rho_growth > 1 and t > 0 and t % o.rho_every == 0:
            U.mul_(1 / o.rho_growth)  # the scaled dual U = y / rho: the dual y is kept
            rho *= o.rho_growth
            Ainv = _inverse_shifted(Hd, rho)  # a larger shift of a matrix that factorised already
            if Ainv is None:
                raise RuntimeError(f"{name}: Cholesky factorisation of the ADMM system failed at rho {rho:g}")
            factorisations += 1
        # W-step: (W0 Hd + rho (Z - U)) (Hd + rho I)^-1 = W0 + rho (Z - U - W0) (Hd + rho I)^-1
        W = torch.addmm(W0, Z - U - W0, Ainv, alpha=rho)
    del Ainv
    Z = (W + U).masked_fill_(cur, 0)
    if o.polish:
        Z = _cg_polish(Z, W0, Hd, ~cur, o.polish)
    E = Z - W0
    # tr(E Hn E^T) = tr(E Hd E^T) - damp ||E||^2: the undamped H is not kept
    num = float((E @ Hd * E).sum()) - damp * float((E * E).sum())
    den = float((W0 @ Hd * W0).sum()) - damp * float((W0 * W0).sum())
    loss = math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0
    out = Z.div_(d[None, :]).masked_fill_(cur, 0)
    return ADMMResult(out.to(weight.dtype), cur, loss, damp, retries, float(rho), factorisations)


@register_method("admm")
class ADMMPruner(LayerPruner):
    """ADMM weight update with gradual mask selection on the calibration Hessian (Boža 2024)."""

    Options = ADMMOptions
    statistic = "hessian"

    def prune(self) -> dict[str, Any]:
        H = self.finalized_statistic()
        o = self.options
        t0 = time.perf_counter()
        res = admm_prune(self.layer.weight.data, H, self.config, o, name=self.layer_name)
        self.layer.weight.data.copy_(res.weight)
        return {
            "admm_loss": res.loss,
            "admm_damp": res.damp,
            "admm_damp_retries": res.retries,
            "admm_rho": res.rho,
            "admm_factorisations": res.factorisations,
            "admm_seconds": time.perf_counter() - t0,
        }

    def free(self) -> None:
        self.stats = None
