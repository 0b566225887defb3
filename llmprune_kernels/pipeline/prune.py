"""Layer-wise sequential pruning of a transformers causal LM (the SparseGPT / Wanda procedure).

Built on ``layerwise`` (capture the first decoder layer's inputs and kwargs, then walk the layers one at a
time on the compute device): on each step, forward hooks on the layer's ``nn.Linear`` modules feed each
method's statistics; then each Linear is pruned through the method registry, and the recompute pass
also measures each Linear's relative reconstruction error ||(W - W')X|| / ||WX||, X being the inputs the
Linear receives when the calibration windows run through the already-pruned network.

``prune_layers`` is the one layer loop: ``prune_model`` runs it on a model in memory, ``stream.prune_pretrained``
on a model whose layers are read from disk one at a time. With an output directory, each completed layer is
checkpointed (``resume``) so that a killed run continues where it stopped.

Methods needing model-level information can define a classmethod ``prepare_model(model, calibration,
config, *, device, options, progress)``; its return value reaches every pruner as ``model_info``.
Methods without calibration (magnitude) prune each layer where it is, without a forward pass, unless the
reconstruction error is asked for.
Non-uniform sparsity (e.g. OWL) is a ``layer_sparsity`` mapping from decoder-layer index to sparsity.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from llmprune_kernels.methods.base import options_for_report
from llmprune_kernels.pipeline.data import DEFAULT_BATCH_SIZE, check_windows
from llmprune_kernels.pipeline.distributed import open_checkpoint, sharding
from llmprune_kernels.pipeline.layerwise import (
    CapturedInputs, InPlace, LayerIO, LayerStep, LayerStrategy, capture_layer_inputs, check_finite_fast, walk_layers,
)
from llmprune_kernels.pipeline.experts import MIN_EXPERT_TOKENS, check_min_expert_tokens, expert_rule
from llmprune_kernels.pipeline.memory import host_buffers
from llmprune_kernels.pipeline.models import find_decoder_layers, prunable_modules
from llmprune_kernels.pipeline.progress import StageTimes, layer_bar, show_layer
from llmprune_kernels.pipeline.plan import _layer_configs, check_run, plan_offload, run_identity
from llmprune_kernels.pipeline.resume import Checkpoint, load_tensors
from llmprune_kernels.pipeline.statistics import feed_statistics
from llmprune_kernels.validation import SparsityConfig

__all__ = ["CapturedInputs", "LayerStep", "LinearStats", "PruneResult", "capture_layer_inputs", "nm_satisfied",
           "prune_layers", "prune_model", "walk_layers"]


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
    stage_times_s: dict[str, float] = field(default_factory=dict)  # seconds per stage (progress.STAGES)
    uses_calibration: bool = True  # False for methods that prune without data (magnitude)
    min_expert_tokens: int | None = None  # the expert rule's threshold (experts.expert_rule)
    activations_offloaded: bool = False  # calibration activations kept in CPU memory (offload / gpu_memory)

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _linear_stats(name, weight, config, rel_error, seconds, extra) -> LinearStats:
    w = weight.detach()
    check_finite_fast(w, f"pruned weight of {name}")
    return LinearStats(
        name=name, shape=(w.shape[0], w.shape[1]), target=config.label,
        sparsity=float((w == 0).sum()) / w.numel(),
        nm_ok=nm_satisfied(w, config.n, config.m) if config.is_nm else None,
        rel_error=rel_error, time_s=seconds, extra=dict(extra),
    )


class _TimedIO(LayerIO):
    """A ``LayerIO`` whose loads and unloads count as the "load" stage."""

    def __init__(self, io: LayerIO, times: StageTimes) -> None:
        self.io, self.times = io, times

    def load(self, index, layer, device):
        with self.times("load"):
            return self.io.load(index, layer, device)

    def unload(self, index, layer, token):
        with self.times("load"):
            self.io.unload(index, layer, token)


def prune_layers(
    model: nn.Module,
    captured: CapturedInputs | None,
    cls: type,
    opts: Any,
    configs: list[SparsityConfig],
    *,
    model_info: Any,
    device: torch.device,
    offload: bool,
    measure_error: bool,
    progress: bool,
    times: StageTimes,
    io: LayerIO | None = None,
    strategy: LayerStrategy | None = None,
    checkpoint: Checkpoint | None = None,
    replay_io: LayerIO | None = None,
    t_start: float | None = None,
    min_expert_tokens: int = MIN_EXPERT_TOKENS,
) -> tuple[list[LinearStats], list[float]]:
    """Prune the decoder layers from ``checkpoint.completed`` on (all without a checkpoint), in order.

    ``captured`` None: no forward pass (methods without calibration, no reconstruction error). ``io`` says
    where each layer's weights come from and go back to, ``strategy`` how a layer's work is shared between
    workers. A resumed run first recomputes the hidden states entering its first layer by running the
    completed (pruned) layers forward, each brought in by ``replay_io`` (default ``io``): the same operations
    on the same weights as the interrupted run, hence the same bits, without storing activations on disk.
    MoE experts are pruned slice by slice, an expert with fewer than ``min_expert_tokens`` calibration tokens
    by per-row magnitude (``experts.expert_rule``).
    Returns this call's report lines and per-layer times (the checkpoint's earlier ones not included).
    """
    t_start = time.perf_counter() if t_start is None else t_start
    path, layers = find_decoder_layers(model)
    needs_data = getattr(cls, "needs_calibration", True)
    strategy = strategy or LayerStrategy()
    start = checkpoint.completed if checkpoint is not None else 0
    hidden = None
    if start > 0 and captured is not None:  # a resumed run: the completed layers' outputs, recomputed
        with times("recompute"):
            for step in walk_layers(model, captured, device, offload, stop=start,
                                    io=_TimedIO(replay_io or io or LayerIO(), times)):
                step.propagate()
                hidden = step.outputs
    prior_elapsed = float(checkpoint.manifest.get("elapsed_s", 0.0)) if checkpoint is not None else 0.0
    steps = walk_layers(model, captured or CapturedInputs([], [], []), device, offload, start=start, hidden=hidden,
                        io=_TimedIO(io or LayerIO(), times))
    stats: list[LinearStats] = []
    layer_times: list[float] = []
    bar = layer_bar(steps, progress, cls.name, configs[0], len(layers), start)
    for step in bar:
        t_layer = time.perf_counter()
        cfg = configs[step.index]
        linears = prunable_modules(step.layer)
        with times("statistics"):
            pruners = {rel: cls(lin, cfg, opts, layer_name=f"{step.name}.{rel}", model_info=model_info)
                       for rel, lin in linears.items()}
            if needs_data:  # a sharded run's strategy feeds its batches and combines them in global order
                feed = getattr(strategy, "feed_statistics", feed_statistics)
                feed(step, {lin: pruners[rel] for rel, lin in linears.items()})
            strategy.reduce_statistics(step, pruners)
            pruners = expert_rule(pruners, linears, cfg, min_expert_tokens, calibrated=needs_data)
        with times("solve"):
            # Snapshot every dense weight before any prune() call: a method may change several Linears of
            # the layer at once (SparseLLM solves the feed-forward block jointly).
            dense = {rel: lin.weight.detach().clone() for rel, lin in linears.items()} if measure_error else {}
            mine = strategy.assigned(step, linears)
            seconds, extras = {}, {}
            for rel in mine:
                _sync(device)
                t0 = time.perf_counter()
                extras[rel] = pruners[rel].prune() or {}
                _sync(device)
                seconds[rel] = time.perf_counter() - t0
                pruners[rel].free()
            for rel in set(pruners) - set(mine):
                pruners[rel].free()
            del pruners
            strategy.share_pruned(step, linears, mine)
            if hasattr(strategy, "gather_reports"):  # prune() times and report fields of every rank's Linears
                seconds, extras = strategy.gather_reports(seconds, extras)
        with times("recompute"):
            errs = {rel: [] for rel in dense}
            hooks = {linears[rel]: _error_hook(dense[rel], errs[rel]) for rel in dense}
            if dense:  # None closes each batch's terms (an MoE expert's Linear may run in some batches only)
                hooks[step.layer] = _batch_end(errs)
            if dense or step.index < len(layers) - 1:
                step.propagate(hooks)
            else:  # nothing reads the last layer's outputs unless its reconstruction error is measured
                step.outputs = []
            del dense, hooks
            if errs and hasattr(strategy, "gather_errors"):  # every rank's batches, in global batch order
                errs = strategy.gather_errors(errs)
        with times("check"):
            layer_stats = []
            for rel, lin in linears.items():
                e = errs.get(rel)
                num, den = (sum(t[0] for t in e if t), sum(t[1] for t in e if t)) if e is not None else (0.0, 0.0)
                rel_err = (num / den) ** 0.5 if den > 0 else (0.0 if e is not None else None)
                layer_stats.append(_linear_stats(f"{step.name}.{rel}", lin.weight, cfg, rel_err,
                                                 seconds.get(rel, 0.0), extras.get(rel, {})))
        stats.extend(layer_stats)
        layer_times.append(time.perf_counter() - t_layer)
        if checkpoint is not None and strategy.writes:
            with times("write"):
                tensors = {f"{step.name}.{k}": v for k, v in step.layer.state_dict().items()}
                checkpoint.save_layer(step.index, tensors, [asdict(s) for s in layer_stats],
                                      layer_times[-1], times.as_dict(),
                                      prior_elapsed + time.perf_counter() - t_start)
        show_layer(bar, device, [s.rel_error for s in layer_stats if s.rel_error is not None])
    if checkpoint is not None and strategy.writes:
        with times("write"):
            checkpoint.wait()  # the last layer's shard is on disk (and a failed write raised) before the output
    return stats, layer_times


def stats_from_checkpoint(checkpoint: Checkpoint | None) -> tuple[list[LinearStats], list[float]]:
    """The report lines and layer times of the layers a checkpoint holds."""
    if checkpoint is None:
        return [], []
    lines = [LinearStats(**{**d, "shape": tuple(d["shape"])}) for d in checkpoint.manifest["linears"]]
    return lines, [float(t) for t in checkpoint.manifest["layer_times_s"]]


def timed_capture(model: nn.Module, calibration: torch.Tensor, device: torch.device, batch_size: int, offload: bool,
                  times: StageTimes) -> tuple[CapturedInputs, float]:
    """``capture_layer_inputs``, counted as the "capture" stage; also returns its seconds."""
    t0 = time.perf_counter()
    with times("capture"):
        captured = capture_layer_inputs(model, calibration, device, batch_size, offload)
    return captured, time.perf_counter() - t0


def walk_model(model: nn.Module, calibration: torch.Tensor | None, cls: type, opts: Any,
               configs: list[SparsityConfig], checkpoint: Checkpoint | None, times: StageTimes, *, walk: bool,
               offload: bool, device: torch.device, batch_size: int, **layer_args: Any,
               ) -> tuple[list[LinearStats], list[float], float]:
    """Capture the first layer's inputs (when the method walks the model) and prune every layer after the
    checkpoint's completed ones, with offloaded activations in pooled page-locked buffers; returns every
    layer's stats (completed ones first), their times and the capture time. ``layer_args`` go to
    ``prune_layers``."""
    captured, capture_time = None, 0.0
    with host_buffers(walk and offload and device.type == "cuda"):
        if walk:
            captured, capture_time = timed_capture(model, calibration, device, batch_size, offload, times)
        done, done_times = stats_from_checkpoint(checkpoint)
        stats, layer_times = prune_layers(model, captured, cls, opts, configs, device=device, offload=offload,
                                          times=times, checkpoint=checkpoint, **layer_args)
        captured = None  # the activations go back to the pool before it closes
    return done + stats, done_times + layer_times, capture_time


def _model_fingerprint(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(model)
    return hashlib.sha256(text.encode()).hexdigest()


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
    gpu_memory: int | None = None,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    min_expert_tokens: int = MIN_EXPERT_TOKENS,
    distributed: bool | None = None,
) -> PruneResult:
    """Prune every ``nn.Linear`` inside the decoder layers of ``model`` in place, layer by layer, and each
    expert matrix of fused MoE experts as its own Linear (``pipeline.experts``; routers stay dense).

    ``calibration``: (n, seqlen) token ids (see ``data.calibration_windows``); may be ``None`` only
    for methods without calibration (magnitude). ``config``: uniform sparsity or N:M (default 50%).
    ``layer_sparsity``: optional decoder-layer index -> sparsity overrides (unstructured only).
    ``options``: the method's options, a mapping or its ``Options`` (checked before any work; see
    ``llmprune methods``). ``measure_error``: the per-Linear reconstruction error on the calibration
    windows; default: for methods that use calibration (for magnitude it would cost a forward pass per
    layer). ``offload_activations`` keeps the calibration activations in CPU memory; ``gpu_memory`` (bytes)
    does so only when they would not fit beside one layer and its statistics.
    ``output_dir``: where the caller will save the pruned model; each completed layer is then checkpointed
    in a work directory beside it (``resume.work_dir_for``), which ``resume=True`` continues after a killed
    run, with the same result bit for bit. Remove it (``resume.remove_work_dir``) once the model is saved.
    ``min_expert_tokens``: an MoE expert that receives fewer calibration tokens is pruned by per-row
    magnitude instead of the method (each expert slice's report line says which rule pruned it).
    ``distributed``: with ``torch.distributed`` initialised over several processes (``None``: whenever it
    is; ``False``: this process alone), every process calls this with the same arguments and they share the
    work (``pipeline.distributed``): each ends with the same pruned model, equal to a one-process run's bit
    for bit; rank 0 alone writes the checkpoints.
    Returns per-Linear statistics, timings and the complete options.
    The embeddings and ``lm_head`` are not pruned (as in the papers).
    """
    t_start = time.perf_counter()
    cls, opts, config = check_run(method, options, config, batch_size, gpu_memory, resume, output_dir)
    check_min_expert_tokens(min_expert_tokens)
    device = torch.device(device)
    _, layers = find_decoder_layers(model)
    configs = _layer_configs(config, len(layers), layer_sparsity)
    needs_data = getattr(cls, "needs_calibration", True)
    if measure_error is None:
        measure_error = needs_data
    if calibration is None and needs_data:
        raise ValueError(f"method {method!r} needs calibration data; pass calibration token windows")
    walk = calibration is not None and (needs_data or measure_error)
    if walk:
        check_windows(calibration, model, "calibration windows")  # before a method's model-level pass
    strategy = sharding(distributed, calibration if walk else None, batch_size)
    progress = progress and (strategy is None or strategy.writes)
    mine = strategy.windows(calibration) if strategy is not None and walk else calibration  # this rank's windows
    checkpoint = None
    if output_dir is not None:
        identity = run_identity(cls, opts, configs, calibration if walk else None, batch_size, measure_error,
                                mode="in-memory", model=type(model).__name__, model_config=_model_fingerprint(model),
                                min_expert_tokens=min_expert_tokens)
        checkpoint = open_checkpoint(strategy, output_dir, identity, len(layers), resume=resume)
    try:
        times = StageTimes(device, checkpoint.manifest["stage_times_s"] if checkpoint else None)
        prior_elapsed = float(checkpoint.manifest.get("elapsed_s", 0.0)) if checkpoint else 0.0
        model_info = None
        prepare = getattr(cls, "prepare_model", None)
        if walk and callable(prepare):
            with times("prepare"):  # before completed layers are restored: it sees the dense model
                model_info = prepare(model, calibration, config, device=device, options=opts, progress=progress)
        if checkpoint is not None:
            with times("load"):
                for i in range(checkpoint.completed):
                    prefix = f"{find_decoder_layers(model)[0]}.{i}."
                    saved = load_tensors(checkpoint.shard(i))
                    layers[i].load_state_dict({k[len(prefix):]: v for k, v in saved.items()}, strict=True)
        offload = offload_activations or plan_offload(model, mine, device, batch_size, gpu_memory)
        stats, layer_times, capture_time = walk_model(
            model, mine, cls, opts, configs, checkpoint, times, walk=walk, offload=offload, device=device,
            batch_size=batch_size, model_info=model_info, measure_error=measure_error and walk, progress=progress,
            io=None if walk else InPlace(), strategy=strategy, t_start=t_start, min_expert_tokens=min_expert_tokens)
    finally:
        if checkpoint is not None:
            checkpoint.release()
    # Model-level methods (GBLM gradients, SparseLLM blocks) summarise themselves through model_info.report().
    report_fn = getattr(model_info, "report", None)
    return PruneResult(method, config, options_for_report(opts), stats, layer_times, capture_time,
                       prior_elapsed + time.perf_counter() - t_start, report_fn() if callable(report_fn) else None,
                       times.as_dict(), needs_data, min_expert_tokens, activations_offloaded=bool(walk and offload))


def _batch_end(errs: dict[str, list]) -> Callable:
    def hook(module, inputs, output):  # returns None: the layer's output is left as it is
        for terms in errs.values():
            terms.append(None)
    return hook


def _error_hook(dense_weight: torch.Tensor, terms: list[tuple[float, float]]) -> Callable:
    """Append ||(W - W')x||^2 and ||Wx||^2 (fp64) of each call from the Linear's input and pruned output;
    summed in order (batch order) they give the layer's error."""
    def hook(module, inputs, output):
        x = inputs[0].detach()
        ref = nn.functional.linear(x, dense_weight).float()
        got = output.detach().float()
        if module.bias is not None:
            got = got - module.bias.detach().float()
        terms.append((float(torch.sum((ref - got) ** 2, dtype=torch.float64)),
                      float(torch.sum(ref ** 2, dtype=torch.float64))))
    return hook
