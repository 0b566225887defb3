"""Prune a model larger than CPU memory: stream it from a safetensors directory, one decoder layer at a time.

``prune_pretrained`` builds the model without weights (``accelerate.init_empty_weights``: parameters on the
meta device, buffers such as the rotary frequencies computed as usual), loads the parts outside the decoder
layers (embeddings, final norm, ``lm_head``; a tied ``lm_head`` is re-tied to the embeddings), then walks the
layers with the same loop as ``prune_model`` (``prune.prune_layers``): each layer's tensors are read from the
source files straight to the compute device when it is reached, and once pruned it is written as one
safetensors shard of the output and goes back to the meta device. CPU memory holds the non-layer parts, a
few layers and the calibration activations; GPU memory one layer, its statistics and the activations (or
one batch of them, with ``gpu_memory``).

The shards accumulate in the run's work directory (``resume``), so a killed run continues with
``resume=True``. At the end the work directory gets the remaining shard, ``model.safetensors.index.json``,
the config and the source's other files (generation config, tokenizer), and becomes the output directory in
one commit. Plain ``transformers.AutoModelForCausalLM.from_pretrained`` loads it.

Checkpoint names: each layer's tensors are converted as ``from_pretrained`` converts them
(``checkpoint_names``: e.g. Mixtral's and Qwen-MoE's per-expert tensors become the fused 3-D expert parameters
that the experts are pruned in, one slice per expert), and the output is written back in the checkpoint's names, as
``save_pretrained`` writes them. Such an output's shards are then written anew from the work directory's, one at a
time (not linked), so the disk holds the model twice until the work directory is removed.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune_kernels.atomic import atomic_dir, check_target, reserve
from llmprune_kernels.methods.base import options_for_report
from llmprune_kernels.pipeline.data import DEFAULT_BATCH_SIZE, check_windows
from llmprune_kernels.pipeline.distributed import on_writer, open_checkpoint, sharding
from llmprune_kernels.pipeline.checkpoint_names import CheckpointNames
from llmprune_kernels.pipeline.experts import MIN_EXPERT_TOKENS, check_min_expert_tokens
from llmprune_kernels.pipeline.layerwise import LayerIO
from llmprune_kernels.pipeline.memory import release_host_memory
from llmprune_kernels.pipeline.models import NO_REMOTE_CODE, find_decoder_layers
from llmprune_kernels.pipeline.progress import StageTimes
from llmprune_kernels.pipeline.plan import _layer_configs, check_run, plan_offload, run_identity
from llmprune_kernels.pipeline.prune import PruneResult, walk_model
from llmprune_kernels.pipeline.model_card import card_for_stream
from llmprune_kernels.pipeline.report import REPORT_FILE, write_json
from llmprune_kernels.pipeline.resume import Checkpoint, load_tensors, save_tensors, shard_name
from llmprune_kernels.validation import SparsityConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files of a model directory that are weights (never copied into the output) rather than config or tokenizer.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


class SafetensorsSource:
    """A local Hugging Face model directory with safetensors weights: which file holds each tensor."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(os.path.expanduser(os.fspath(path))).resolve()
        if not self.path.is_dir() or not (self.path / "config.json").is_file():
            raise ValueError(f"model source {str(path)!r} is not a model directory with a config.json; allowed: a "
                             f"local Hugging Face directory with {SINGLE} or sharded model-*.safetensors + {INDEX}")
        if (self.path / INDEX).is_file():
            index = json.loads((self.path / INDEX).read_text())
            self.weight_map: dict[str, str] = dict(index.get("weight_map") or {})
            missing = sorted({f for f in self.weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{INDEX} of {str(self.path)!r} names missing shard file(s) {missing}")
        elif (self.path / SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(str(self.path / SINGLE), framework="pt") as f:
                self.weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise FileNotFoundError(f"model directory {str(self.path)!r} has neither {SINGLE} nor {INDEX}; streaming "
                                    f"needs safetensors weights (save_pretrained writes them)")

    def fingerprint(self) -> dict[str, Any]:
        """The directory and the size of each weight file (what a resumed run must find unchanged)."""
        files = sorted(set(self.weight_map.values()))
        return {"source": str(self.path), "source_files": {f: (self.path / f).stat().st_size for f in files}}

    def read(self, keys: Sequence[str], device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The tensors ``keys``, each read from its file straight to ``device`` (floating ones cast to ``dtype``)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.weight_map[k], []).append(k)
        out = {}
        for name, names in by_file.items():
            with safe_open(str(self.path / name), framework="pt", device=str(device)) as f:
                for k in names:
                    t = f.get_tensor(k)
                    out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    def stored_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating tensor in the files."""
        from safetensors import safe_open

        for name in sorted(set(self.weight_map.values())):
            with safe_open(str(self.path / name), framework="pt") as f:
                for k in f.keys():
                    t = f.get_slice(k)
                    dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                          "F64": torch.float64}.get(t.get_dtype())
                    if dt is not None:
                        return dt
        return None


def build_empty_model(source: SafetensorsSource, dtype: torch.dtype | None) -> nn.Module:
    """The source's causal LM with its parameters on the meta device (buffers computed as usual)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source.path, **NO_REMOTE_CODE)
    dtype = dtype or getattr(config, "dtype", None) or source.stored_dtype() or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **NO_REMOTE_CODE)
    find_decoder_layers(model)
    return model.eval()


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def layer_keys(model: nn.Module, source: SafetensorsSource, names: CheckpointNames) -> list[list[str]]:
    """Per decoder layer, the checkpoint names of its tensors; an error naming the first model tensor missing."""
    path, layers = find_decoder_layers(model)
    keys = list(model.state_dict())
    out = []
    for i in range(len(layers)):
        prefix = f"{path}.{i}."
        layer = names.keys_under(prefix)
        covered = {t for k in layer for t in names.targets(k)}
        missing = [k for k in keys if k.startswith(prefix) and k not in covered]
        if missing:
            raise ValueError(f"{str(source.path)!r} has no tensor for {missing[0]!r} (of {len(missing)} missing); "
                             f"streaming needs the checkpoint names transformers loads into this model (its own, or "
                             f"those its conversion mapping converts), e.g. {next(iter(source.weight_map), None)!r}; "
                             f"load it with load_model and use prune_model")
        out.append(layer)
    return out


def load_non_layer_parts(model: nn.Module, source: SafetensorsSource, dtype: torch.dtype | None,
                         names: CheckpointNames) -> list[str]:
    """Load everything outside the decoder layers to the CPU, re-tie tied weights; their model names."""
    path, _ = find_decoder_layers(model)
    keys = names.keys_under(path + ".", inside=False)
    loaded = names.to_model(source.read(keys, torch.device("cpu"), dtype))
    for k, v in loaded.items():
        _set_tensor(model, k, v)
    model.tie_weights()
    left = [n for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
            if t.is_meta and not n.startswith(path + ".")]
    if left:
        raise ValueError(f"{str(source.path)!r} has no tensor {left[0]!r}, which is not tied to another; allowed: a "
                         f"checkpoint holding every tensor of the model outside its decoder layers")
    return list(loaded)


class StreamIO(LayerIO):
    """Decoder layers read from the source files to the compute device (converted to the model's tensors), and
    back to meta after their step."""

    def __init__(self, source: SafetensorsSource, keys: list[list[str]], prefix: str, dtype: torch.dtype | None,
                 names: CheckpointNames):
        self.source, self.keys, self.prefix, self.dtype, self.names = source, keys, prefix, dtype, names

    def load(self, index: int, layer: nn.Module, device: torch.device) -> Any:
        cut = len(f"{self.prefix}.{index}.")
        tensors = self.names.to_model(self.source.read(self.keys[index], device, self.dtype))
        layer.load_state_dict({k[cut:]: v for k, v in tensors.items()}, strict=True, assign=True)
        return None

    def unload(self, index: int, layer: nn.Module, token: Any) -> None:
        layer.to("meta")
        release_host_memory()


class CompletedIO(StreamIO):
    """Decoder layers a resumed run completed earlier, read back from its checkpoint shards (the model's names)."""

    def __init__(self, checkpoint: Checkpoint, prefix: str, dtype: torch.dtype | None):
        self.checkpoint, self.prefix, self.dtype = checkpoint, prefix, dtype

    def load(self, index: int, layer: nn.Module, device: torch.device) -> Any:
        cut = len(f"{self.prefix}.{index}.")
        tensors = load_tensors(self.checkpoint.shard(index), device)
        layer.load_state_dict({k[cut:]: v for k, v in tensors.items()}, strict=True, assign=True)
        return None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same file system: no second copy of the weights
    except OSError:
        shutil.copy2(src, dst)


def _write_index(folder: Path, shards: list[Path]) -> None:
    from safetensors import safe_open

    weight_map, total = {}, 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():
                weight_map[k] = shard.name
                sl = f.get_slice(k)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                total += numel * {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2,
                                  "U8": 1, "I8": 1, "BOOL": 1}.get(sl.get_dtype(), 4)
    write_json({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, folder / INDEX)


def prune_pretrained(
    source_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    calibration: torch.Tensor | None,
    method: str = "wanda",
    config: SparsityConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    layer_sparsity: Mapping[int, float | SparsityConfig] | Sequence[float] | None = None,
    options: Any = None,
    measure_error: bool | None = None,
    dtype: torch.dtype | None = None,
    gpu_memory: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    extra_json: Callable[[PruneResult], Mapping[str, Any]] | None = None,
    distributed: bool | None = None,
    min_expert_tokens: int = MIN_EXPERT_TOKENS,
) -> PruneResult:
    """Prune the model in ``source_dir`` (safetensors) into ``output_dir``, one decoder layer in memory at a time.

    The arguments shared with ``prune_model`` mean the same, and the output equals ``prune_model`` on the
    loaded model followed by ``save_model``, bit for bit. ``dtype``: compute and output dtype (default: the
    checkpoint's). ``gpu_memory`` (bytes): keep the calibration activations in pinned CPU memory when they
    would not fit on the GPU beside one layer. ``resume``: continue a killed run from its last completed
    layer. ``overwrite``: replace an existing ``output_dir`` (only once the new one is complete).
    ``extra_json``: given the result, the JSON files (name -> object) to add to the output, e.g. a report.
    ``distributed``: as for ``prune_model``; every process reads the layers, rank 0 alone writes the output
    (and calls ``extra_json``), the others reading its checkpoint shards when resuming (one file system).
    ``min_expert_tokens``: as for ``prune_model`` (MoE experts with fewer calibration tokens: per-row magnitude).
    """
    t_start = time.perf_counter()
    cls, opts, config = check_run(method, options, config, batch_size, gpu_memory, resume, output_dir)
    check_min_expert_tokens(min_expert_tokens)
    device = torch.device(device)
    target = check_target(output_dir, overwrite=overwrite, kind="dir")
    times = StageTimes(device)
    with times("load"):
        source = SafetensorsSource(source_dir)
        model = build_empty_model(source, dtype)
    path, layers = find_decoder_layers(model)
    configs = _layer_configs(config, len(layers), layer_sparsity)
    names = CheckpointNames(model, source.weight_map)
    keys = layer_keys(model, source, names)
    needs_data = getattr(cls, "needs_calibration", True)
    if measure_error is None:
        measure_error = needs_data
    if calibration is None and needs_data:
        raise ValueError(f"method {method!r} needs calibration data; pass calibration token windows")
    walk = calibration is not None and (needs_data or measure_error)
    if walk:
        check_windows(calibration, model)
    identity = run_identity(cls, opts, configs, calibration if walk else None, batch_size, measure_error,
                            mode="streamed", dtype=str(next(model.parameters()).dtype),
                            min_expert_tokens=min_expert_tokens, **source.fingerprint())
    strategy = sharding(distributed, calibration if walk else None, batch_size)
    writes = strategy is None or strategy.writes
    progress = progress and writes
    mine = strategy.windows(calibration) if strategy is not None and walk else calibration  # this rank's windows
    # a second run on this output fails from here on
    with reserve(target, overwrite=overwrite, kind="dir") if writes else contextlib.nullcontext():
        checkpoint = open_checkpoint(strategy, target, identity, len(layers), resume=resume)
        try:
            times.add(checkpoint.manifest["stage_times_s"])
            prior_elapsed = float(checkpoint.manifest.get("elapsed_s", 0.0))
            with times("load"):
                rest = load_non_layer_parts(model, source, dtype, names)
            model_info = None
            prepare = getattr(cls, "prepare_model", None)
            if walk and callable(prepare):
                with times("prepare"):
                    model_info = _prepare_streamed(prepare, cls, model, calibration, config, device, opts, progress)
            offload = plan_offload(model, mine, device, batch_size, gpu_memory)
            stats, layer_times, capture_time = walk_model(
                model, mine, cls, opts, configs, checkpoint, times, walk=walk, offload=offload, device=device,
                batch_size=batch_size, model_info=model_info, measure_error=measure_error and walk,
                progress=progress, io=StreamIO(source, keys, path, dtype, names), strategy=strategy,
                replay_io=CompletedIO(checkpoint, path, dtype), t_start=t_start, min_expert_tokens=min_expert_tokens)
            report_fn = getattr(model_info, "report", None)
            result = PruneResult(method, config, options_for_report(opts), stats, layer_times,
                                 capture_time, 0.0, report_fn() if callable(report_fn) else None,
                                 uses_calibration=needs_data, min_expert_tokens=min_expert_tokens,
                                 activations_offloaded=bool(walk and offload))
            with times("write"):  # rank 0 writes; the others learn whether it could
                on_writer(strategy, lambda: _finish(model, source, names, rest, checkpoint, target, overwrite,
                                                    result, extra_json, times, t_start, prior_elapsed))
            if writes:
                checkpoint.remove()
        finally:
            checkpoint.release()
    result.stage_times_s = times.as_dict()
    result.total_time_s = prior_elapsed + time.perf_counter() - t_start
    return result


def _prepare_streamed(prepare, cls, model, calibration, config, device, opts, progress):
    try:
        return prepare(model, calibration, config, device=device, options=opts, progress=progress)
    except (NotImplementedError, RuntimeError) as exc:
        raise ValueError(f"method {cls.name!r} needs the whole model's weights before pruning (its prepare_model "
                         f"failed on the streamed model, whose layers are read one at a time: {exc}); give it what "
                         f"it precomputes as options (see 'llmprune methods {cls.name}'), or load the model with "
                         f"load_model and use prune_model") from exc


def _finish(model, source, names, rest, checkpoint, target, overwrite, result, extra_json, times, t_start,
            prior_elapsed) -> None:
    """The remaining shard, index, config and tokenizer files; then the work directory becomes the output (its
    shards in the checkpoint's names when they differ from the model's, ``checkpoint_names``)."""
    work = checkpoint.path
    n = checkpoint.num_layers
    state = model.state_dict()
    save_tensors({k: state[k] for k in rest}, work / shard_name(n, n + 1))
    shards = [work / shard_name(i, n + 1) for i in range(n + 1)]
    _write_index(work, shards)
    model.config.save_pretrained(work)
    for f in sorted(source.path.iterdir()):
        if f.is_file() and f.name != "config.json" and not f.name.startswith(".") \
                and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(f, work / f.name)
    result.stage_times_s = times.as_dict()  # as of now: the JSON files are written before the commit
    result.total_time_s = prior_elapsed + time.perf_counter() - t_start
    extras = dict(extra_json(result) if extra_json else {})
    for name, obj in extras.items():
        write_json(obj, work / name)
    # The output's README.md is the pruned model's card (the source's, copied above, is replaced).
    card_for_stream(work, extras.get(REPORT_FILE), result, source.path)
    keep = {p.name for p in checkpoint.state_files()}
    convert = {s.name for s in shards} if names.converts else set()
    with atomic_dir(target, overwrite=overwrite) as tmp:
        for f in work.iterdir():
            if f.name in keep or (convert and f.name == INDEX):
                continue
            if f.name in convert:  # one shard in memory at a time; the work directory keeps the model's names
                save_tensors(names.to_checkpoint(load_tensors(f)), tmp / f.name)
            else:
                _link_or_copy(f, tmp / f.name)
        if convert:
            _write_index(tmp, [tmp / s.name for s in shards])
