"""Layer-wise sequential pruning of a transformers causal LM (the SparseGPT / Wanda procedure).

Built on ``layerwise`` (capture the first decoder layer's inputs and kwargs, then walk the layers one at a
time on the compute device): on each step, forward hooks on the layer's ``nn.Linear`` modules feed each
method's ``add_batch``; then each Linear is pruned through the method registry, and the recompute pass
also measures each Linear's relative reconstruction error ||(W - W')X|| / ||WX||, X being the inputs the
Linear receives when the calibration windows run through the already-pruned network.

Methods needing model-level information can define a classmethod ``prepare_model(model, calibration,
config, *, device, options, progress)``; its return value reaches every pruner as ``model_info``.
Methods without calibration (magnitude) skip the layer walk unless the reconstruction error is asked for.
Non-uniform sparsity (e.g. OWL) is a ``layer_sparsity`` mapping from decoder-layer index to sparsity.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from llmprune_kernels.methods import check_options, get_method
from llmprune_kernels.methods.base import options_for_report
from llmprune_kernels.pipeline.data import DEFAULT_BATCH_SIZE
from llmprune_kernels.pipeline.layerwise import (
    CapturedInputs, LayerStep, capture_layer_inputs, check_finite_fast, walk_layers,
)
from llmprune_kernels.pipeline.models import find_decoder_layers, linear_modules
from llmprune_kernels.pipeline.statistics import feed_statistics
from llmprune_kernels.validation import SparsityConfig

__all__ = ["CapturedInputs", "LayerStep", "LinearStats", "PruneResult", "capture_layer_inputs", "nm_satisfied",
           "prune_model", "walk_layers"]


@dataclass
class LinearStats:
    """Report line of one pruned Linear."""

    name: str
    shape: tuple[int, int]
    target: str
    sparsity: float  # fraction of exact zeros after pruning
    nm_ok: bool | None  # every group of M input columns has >= N zeros (N:M only)
    rel_error: float | None  # ||(W - W')X|| / ||WX|| on calibration inputs (None without calibration)
    time_s: float  # time of the method's prune() call
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PruneResult:
    method: str
    config: SparsityConfig
    options: dict[str, Any]  # the validated options with defaults filled in (JSON-able)
    linears: list[LinearStats]
    layer_times_s: list[float]
    capture_time_s: float
    total_time_s: float
    method_report: dict[str, Any] | None = None  # from the method's model_info.report(), if it has one

    @property
    def overall_sparsity(self) -> float:
        total = sum(s.shape[0] * s.shape[1] for s in self.linears)
        return sum(s.sparsity * s.shape[0] * s.shape[1] for s in self.linears) / max(total, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = {"sparsity": self.config.sparsity, "n": self.config.n, "m": self.config.m,
                       "label": self.config.label}
        d["overall_sparsity"] = self.overall_sparsity
        return d


def nm_satisfied(weight: torch.Tensor, n: int, m: int) -> bool:
    """Every group of ``m`` consecutive input columns holds at least ``n`` zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(dim=2)
    return bool((zeros >= n).all())


def _layer_configs(config: SparsityConfig, nlayers: int,
                   layer_sparsity: Mapping[int, float | SparsityConfig] | Sequence[float] | None) -> list[SparsityConfig]:
    if layer_sparsity is None:
        return [config] * nlayers
    if config.is_nm:
        raise ValueError(f"per-layer sparsity cannot be combined with the N:M pattern {config.label}")
    items = layer_sparsity.items() if isinstance(layer_sparsity, Mapping) else enumerate(layer_sparsity)
    out = [config] * nlayers
    for i, s in items:
        if not isinstance(i, int) or not 0 <= i < nlayers:
            raise ValueError(f"per-layer sparsity names layer {i!r}; allowed: decoder layer indices 0..{nlayers - 1}")
        out[i] = s if isinstance(s, SparsityConfig) else SparsityConfig(sparsity=s)
    if not isinstance(layer_sparsity, Mapping) and len(layer_sparsity) != nlayers:
        raise ValueError(f"per-layer sparsity has {len(layer_sparsity)} entries; the model has {nlayers} decoder layers")
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prune_without_data(model, cls, configs, options, progress) -> tuple[list[LinearStats], list[float]]:
    """Methods that need no calibration (magnitude): each Linear where it is, no forward pass."""
    path, layers = find_decoder_layers(model)
    stats, times = [], []
    for i, layer in enumerate(_bar(layers, progress, cls.name, configs[0])):
        t_layer = time.perf_counter()
        for rel, lin in linear_modules(layer).items():
            name = f"{path}.{i}.{rel}"
            t0 = time.perf_counter()
            pruner = cls(lin, configs[i], options, layer_name=name)
            extra = pruner.prune() or {}
            pruner.free()
            stats.append(_linear_stats(name, lin.weight, configs[i], None, time.perf_counter() - t0, extra))
        times.append(time.perf_counter() - t_layer)
    return stats, times


def _linear_stats(name, weight, config, rel_error, seconds, extra) -> LinearStats:
    w = weight.detach()
    check_finite_fast(w, f"pruned weight of {name}")
    return LinearStats(
        name=name, shape=(w.shape[0], w.shape[1]), target=config.label,
        sparsity=float((w == 0).sum()) / w.numel(),
        nm_ok=nm_satisfied(w, config.n, config.m) if config.is_nm else None,
        rel_error=rel_error, time_s=seconds, extra=dict(extra),
    )


def _bar(iterable, progress: bool, method: str, config: SparsityConfig, total: int | None = None):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=f"pruning {method} {config.label}", unit="layer", total=total, dynamic_ncols=True)


def prune_model(
    model: nn.Module,
    calibration: torch.Tensor | None,
    method: str = "wanda",
    config: SparsityConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    layer_sparsity: Mapping[int, float | SparsityConfig] | Sequence[float] | None = None,
    options: Any = None,
    measure_error: bool | None = None,
    offload_activations: bool = False,
    progress: bool = True,
) -> PruneResult:
    """Prune every ``nn.Linear`` inside the decoder layers of ``model`` in place, layer by layer.

    ``calibration``: (n, seqlen) token ids (see ``data.calibration_windows``); may be ``None`` only
    for methods without calibration (magnitude). ``config``: uniform sparsity or N:M (default 50%).
    ``layer_sparsity``: optional decoder-layer index -> sparsity overrides (unstructured only).
    ``options``: the method's options, a mapping or its ``Options`` (checked before any work; see
    ``llmprune methods``). ``measure_error``: the per-Linear reconstruction error on the calibration
    windows; default: for methods that use calibration (for magnitude it would cost a forward pass per
    layer). Returns per-Linear statistics, timings and the complete options.
    The embeddings and ``lm_head`` are not pruned (as in the papers).
    """
    t_start = time.perf_counter()
    cls = get_method(method)
    opts = check_options(cls, options)
    config = config or SparsityConfig()
    device = torch.device(device)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size {batch_size!r} is invalid; allowed: an integer >= 1")
    _, layers = find_decoder_layers(model)
    configs = _layer_configs(config, len(layers), layer_sparsity)
    needs_data = getattr(cls, "needs_calibration", True)
    if measure_error is None:
        measure_error = needs_data
    if calibration is None or not (needs_data or measure_error):
        if needs_data:
            raise ValueError(f"method {method!r} needs calibration data; pass calibration token windows")
        stats, times = _prune_without_data(model, cls, configs, opts, progress)
        return PruneResult(method, config, options_for_report(opts), stats, times, 0.0,
                           time.perf_counter() - t_start)

    prepare = getattr(cls, "prepare_model", None)
    model_info = None
    if callable(prepare):
        model_info = prepare(model, calibration, config, device=device, options=opts, progress=progress)
    t0 = time.perf_counter()
    captured = capture_layer_inputs(model, calibration, device, batch_size, offload_activations)
    capture_time = time.perf_counter() - t0

    stats: list[LinearStats] = []
    times: list[float] = []
    bar = _bar(walk_layers(model, captured, device, offload_activations), progress, method, config, len(layers))
    for step in bar:
        t_layer = time.perf_counter()
        cfg = configs[step.index]
        linears = linear_modules(step.layer)
        pruners = {rel: cls(lin, cfg, opts, layer_name=f"{step.name}.{rel}", model_info=model_info)
                   for rel, lin in linears.items()}
        if needs_data:
            feed_statistics(step, {lin: pruners[rel] for rel, lin in linears.items()})
        # Snapshot every dense weight before any prune() call: a method may change several Linears of
        # the layer at once (SparseLLM solves the feed-forward block jointly).
        dense = {rel: lin.weight.detach().clone() for rel, lin in linears.items()} if measure_error else {}
        seconds, extras = {}, {}
        for rel, lin in linears.items():
            _sync(device)
            t0 = time.perf_counter()
            extras[rel] = pruners[rel].prune() or {}
            _sync(device)
            seconds[rel] = time.perf_counter() - t0
            pruners[rel].free()
        del pruners
        errs = {rel: [0.0, 0.0] for rel in dense}
        step.propagate({linears[rel]: _error_hook(dense[rel], errs[rel]) for rel in dense})
        del dense
        layer_stats = []
        for rel, lin in linears.items():
            e = errs.get(rel)
            rel_err = (e[0] / e[1]) ** 0.5 if e and e[1] > 0 else (0.0 if e else None)
            layer_stats.append(_linear_stats(f"{step.name}.{rel}", lin.weight, cfg, rel_err, seconds[rel], extras[rel]))
        stats.extend(layer_stats)
        times.append(time.perf_counter() - t_layer)
        if progress and measure_error and layer_stats:
            bar.set_postfix(err=f"{sum(s.rel_error for s in layer_stats) / len(layer_stats):.3f}")
    # Model-level methods (GBLM gradients, SparseLLM blocks) summarise themselves through model_info.report().
    report_fn = getattr(model_info, "report", None)
    return PruneResult(method, config, options_for_report(opts), stats, times, capture_time,
                       time.perf_counter() - t_start, report_fn() if callable(report_fn) else None)


def _error_hook(dense_weight: torch.Tensor, acc: list[float]) -> Callable:
    """Accumulate ||(W - W')x||^2 and ||Wx||^2 in fp64 from the Linear's input and pruned output."""
    def hook(module, inputs, output):
        x = inputs[0].detach()
        ref = nn.functional.linear(x, dense_weight).float()
        got = output.detach().float()
        if module.bias is not None:
            got = got - module.bias.detach().float()
        acc[0] += float(torch.sum((ref - got) ** 2, dtype=torch.float64))
        acc[1] += float(torch.sum(ref ** 2, dtype=torch.float64))
    return hook
