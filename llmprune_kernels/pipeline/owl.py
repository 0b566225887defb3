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

from llmprune_kernels.pipeline.data import DEFAULT_BATCH_SIZE
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
    model: nn.Module,
    calibration: torch.Tensor,
    m: float = OWL_M,
    device: torch.device | str = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> list[float]:
    """OWL outlier ratio of every decoder layer, from Wanda scores on the dense model.

    As the reference, the calibration windows (``(n, seqlen)`` token ids) are propagated layer by layer
    through the dense model (the pipeline's ``walk_layers``: one layer on ``device`` at a time); each
    layer's Linears collect Wanda's input norms on the way.
    """
    from llmprune_kernels.pipeline.models import find_decoder_layers, linear_modules
    from llmprune_kernels.pipeline.layerwise import capture_layer_inputs, walk_layers
    from llmprune_kernels.reference.wanda import ActNormStats, wanda_score

    if not (isinstance(m, (int, float)) and math.isfinite(m) and m > 0):
        raise ValueError(f"OWL M {m!r} is invalid; allowed: a finite number > 0 (default {OWL_M})")
    captured = capture_layer_inputs(model, calibration, device, batch_size)
    steps = walk_layers(model, captured, device)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="OWL outlier ratios", unit="layer", total=len(find_decoder_layers(model)[1]),
                     dynamic_ncols=True)
    ratios = []
    for step in steps:
        lins = linear_modules(step.layer)
        if not lins:
            raise ValueError(f"decoder layer {step.name} has no Linear modules; OWL needs Wanda scores of each layer")
        stats = {rel: ActNormStats(lin.in_features, device=lin.weight.device) for rel, lin in lins.items()}

        def hook(st, tag):
            return lambda _mod, inp, _out: st.add_batch(inp[0].detach(), name=tag)

        step.propagate({lin: hook(stats[rel], f"{step.name}.{rel} inputs") for rel, lin in lins.items()})
        ratios.append(outlier_ratio((wanda_score(lin.weight, stats[rel].scaler_row) for rel, lin in lins.items()), m))
    return ratios


def owl_layer_sparsity(
    model: nn.Module,
    calibration: torch.Tensor,
    target: float,
    m: float = OWL_M,
    lam: float = OWL_LAMBDA,
    device: torch.device | str = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> tuple[list[float], dict]:
    """Per-decoder-layer sparsities for ``prune_model(layer_sparsity=...)`` and a JSON-able OWL report."""
    _check_params(target, lam, 0.0, 0.99)
    ratios = collect_outlier_ratios(model, calibration, m, device, batch_size, progress)
    weights = layer_param_counts(model)
    sparsities = owl_sparsities(ratios, target, lam, weights=weights)
    total = sum(weights)
    report = {
        "owl": {
            "M": float(m), "lambda": float(lam), "target": float(target),
            "outlier_ratios_percent": ratios, "layer_sparsity": sparsities,
            "weighted_mean_sparsity": sum(s * w for s, w in zip(sparsities, weights)) / total,
        }
    }
    return sparsities, report


def layer_param_counts(model: nn.Module) -> list[int]:
    """Number of prunable (decoder Linear) weights per decoder layer: OWL's weights for the mean."""
    from llmprune_kernels.pipeline.models import find_decoder_layers

    _, layers = find_decoder_layers(model)
    return [sum(mod.weight.numel() for mod in layer.modules() if isinstance(mod, nn.Linear)) for layer in layers]


def add_cli_arguments(parser) -> None:
    """``--owl``, ``--owl-m``, ``--owl-lambda`` for ``llmprune prune``."""
    parser.add_argument("--owl", action="store_true",
                        help="OWL non-uniform layer-wise sparsity (mean over layers = --sparsity; any method)")
    parser.add_argument("--owl-m", type=float, default=OWL_M,
                        help=f"OWL outlier threshold M: scores above M x the layer mean (default {OWL_M:g})")
    parser.add_argument("--owl-lambda", type=float, default=OWL_LAMBDA,
                        help="OWL lambda: layer sparsities spread over a window 2*lambda wide around --sparsity "
                             f"(default {OWL_LAMBDA:g})")


def cli_layer_sparsity(args, model: nn.Module, calibration, config, device) -> tuple[list[float] | None, dict]:
    """(layer_sparsity for prune_model, report entries) from the parsed ``--owl*`` arguments."""
    if not getattr(args, "owl", False):
        return None, {}
    if config.is_nm:
        raise ValueError(f"--owl allocates unstructured sparsity per layer; it cannot be combined with "
                         f"--pattern {config.label}")
    if calibration is None:
        raise ValueError("--owl needs calibration windows (its outlier ratios come from Wanda scores)")
    return owl_layer_sparsity(model, calibration, config.sparsity, args.owl_m, args.owl_lambda, device=device,
                              batch_size=getattr(args, "batch_size", DEFAULT_BATCH_SIZE),
                              progress=not getattr(args, "quiet", False))
