"""OWL: outlier-weighted layer-wise sparsity (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity").

Per decoder layer, the outlier ratio D_l is the share (in percent, as the reference) of the Wanda scores
|W|·sqrt(||X_j||^2) of all its Linears that exceed M times the mean of those scores (``check_outlier_mean``
of the reference code), measured on the *dense* model. The reference (``prune_wanda_outlier``) then maps

    r_l   = (D_l - min D) / (max D - min D) * 2*lambda          (in [0, 2*lambda])
    s_l   = target - (r_l - mean(r))                             (more outliers -> lower sparsity)

so the plain mean of the per-layer sparsities over layers is the target, spread over a window 2*lambda wide.

Our choices, documented: (1) the mean is taken with optional per-layer weights (the pipeline passes each
layer's count of prunable weights); with equal weights, as in every LLaMA-family or OPT model where all
decoder layers have the same shape, this is exactly the reference mapping and also makes the
parameter-weighted mean exact. (2) If some s_l would leave [lo, hi] (reference: only a floor at 0.01
for the density), we clip and re-shift all layers by one constant found by bisection, so the (weighted)
mean stays exactly the target and the order of the layers is kept. (3) When all ratios are equal the
reference divides by zero; we return the uniform target.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

from llmprune_kernels.validation import check_sparsity

OWL_M = 5.0
OWL_LAMBDA = 0.08


def outlier_ratio(scores: Iterable[torch.Tensor], m: float = OWL_M) -> float:
    """Percent of entries of the concatenated scores above ``m`` times their mean (OWL ``check_outlier_mean``)."""
    flat = torch.cat([s.detach().flatten().float().cpu() for s in scores])
    if flat.numel() == 0:
        raise ValueError("outlier_ratio got no scores")
    return float((flat > flat.mean() * m).sum()) / flat.numel() * 100.0


def _check_params(target: float, lam: float, lo: float, hi: float) -> None:
    check_sparsity(target)
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"OWL lambda {lam!r} is invalid; allowed: a finite number >= 0 (default {OWL_LAMBDA})")
    if not (0.0 <= lo <= target <= hi < 1.0):
        raise ValueError(f"OWL bounds [{lo}, {hi}] must satisfy 0 <= lo <= target ({target}) <= hi < 1")


def owl_sparsities(
    ratios: Sequence[float],
    target: float,
    lam: float = OWL_LAMBDA,
    weights: Sequence[float] | None = None,
    lo: float = 0.0,
    hi: float = 0.99,
) -> list[float]:
    """Per-layer sparsities from per-layer outlier ratios (OWL mapping; weighted mean exactly ``target``)."""
    _check_params(target, lam, lo, hi)
    d = torch.tensor([float(r) for r in ratios], dtype=torch.float64)
    if d.numel() == 0:
        raise ValueError("owl_sparsities needs at least one layer ratio")
    if not torch.isfinite(d).all():
        raise ValueError(f"outlier ratios must be finite, got {ratios}")
    w = torch.ones_like(d) if weights is None else torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if w.shape != d.shape or (w <= 0).any():
        raise ValueError(f"layer weights must be {d.numel()} positive numbers, got {weights}")
    w = w / w.sum()
    span = d.max() - d.min()
    if span == 0:
        return [float(target)] * d.numel()
    r = (d - d.min()) / span * (2.0 * lam)
    s = target - (r - (w * r).sum())
    if s.min() >= lo and s.max() <= hi:
        return [float(x) for x in s]
    # Clip and shift by one constant c so that sum_l w_l * clip(s_l + c) == target (monotone in c: bisection).
    a, b = lo - float(s.max()), hi - float(s.min())
    for _ in range(200):
        c = 0.5 * (a + b)
        if float((w * (s + c).clamp(lo, hi)).sum()) < target:
            a = c
        else:
            b = c
    return [float(x) for x in (s + 0.5 * (a + b)).clamp(lo, hi)]


@torch.no_grad()
def collect_outlier_ratios(
    model: nn.Module, samples: Sequence[torch.Tensor], m: float = OWL_M, progress: bool = False
) -> list[float]:
    """OWL outlier ratio of every decoder layer, from Wanda scores on the dense model.

    The reference propagates the calibration set layer by layer through the dense model; nothing is pruned
    in that pass, so one full forward per sample with input hooks on every decoder Linear gives the same
    statistics.
    """
    from llmprune_kernels.gradients import decoder_layers
    from llmprune_kernels.reference.wanda import ActNormStats, wanda_score

    layers = decoder_layers(model)
    stats: list[dict[str, tuple[nn.Linear, ActNormStats]]] = []
    handles = []
    for li, layer in enumerate(layers):
        per = {}
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                st = ActNormStats(mod.in_features, device=mod.weight.device)
                per[name] = (mod, st)
                handles.append(
                    mod.register_forward_hook(
                        lambda _m, inp, _out, st=st, tag=f"layers.{li}.{name} inputs": st.add_batch(inp[0], name=tag)
                    )
                )
        stats.append(per)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        it = samples
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(samples, desc="OWL outlier ratios", unit="sample")
        for ids in it:
            ids = torch.as_tensor(ids)
            model(input_ids=(ids if ids.dim() == 2 else ids.unsqueeze(0)).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    ratios = []
    for per in stats:
        if not per:
            raise ValueError("a decoder layer has no Linear modules; OWL needs Wanda scores of each layer")
        ratios.append(outlier_ratio((wanda_score(mod.weight, st.scaler_row) for mod, st in per.values()), m))
    return ratios


def layer_param_counts(model: nn.Module) -> list[int]:
    """Number of prunable (decoder Linear) weights per decoder layer: OWL's weights for the mean."""
    from llmprune_kernels.gradients import decoder_layers

    return [
        sum(mod.weight.numel() for mod in layer.modules() if isinstance(mod, nn.Linear))
        for layer in decoder_layers(model)
    ]
