"""What a pruning run will do, decided before any work: the checked arguments, each decoder layer's sparsity,
the identity a resumed run must share, and where the calibration activations live (``gpu_memory``)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from llmprune_kernels.methods import check_options, get_method
from llmprune_kernels.methods.base import options_for_report
from llmprune_kernels.pipeline.memory import check_gpu_memory, layer_need_bytes, offload_needed
from llmprune_kernels.pipeline.models import find_decoder_layers, prunable_modules
from llmprune_kernels.pipeline.resume import calibration_digest
from llmprune_kernels.validation import SparsityConfig, check_config

__all__ = ["check_run", "plan_offload", "run_identity"]


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


def check_run(method: str, options: Any, config: SparsityConfig | None, batch_size: int, gpu_memory: int | None,
              resume: bool, output_dir: Any) -> tuple[type, Any, SparsityConfig]:
    """The method class, its validated options and the sparsity config; errors before any work."""
    cls = get_method(method)
    opts = check_options(cls, options)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size {batch_size!r} is invalid; allowed: an integer >= 1")
    check_gpu_memory(gpu_memory)
    if resume and output_dir is None:
        raise ValueError("resume=True needs an output directory (output_dir=...): the run's checkpoints live "
                         "beside it")
    return cls, opts, SparsityConfig() if config is None else check_config(config)


def run_identity(cls, opts, configs: list[SparsityConfig], calibration, batch_size: int, measure_error: bool,
                 **source: Any) -> dict[str, Any]:
    """What a resumed run must share with the run it continues (checked field by field)."""
    return {"method": cls.name, "sparsity": [c.label for c in configs], "options": options_for_report(opts),
            "calibration_sha256": calibration_digest(calibration), "batch_size": batch_size,
            "measure_error": measure_error, **source}


def plan_offload(model: nn.Module, calibration: torch.Tensor | None, device: torch.device, batch_size: int,
                 gpu_memory: int | None) -> bool:
    """Whether the activations of the largest layer's walk would exceed ``gpu_memory`` on ``device``."""
    if calibration is None or device.type != "cuda" or gpu_memory is None:
        return False
    _, layers = find_decoder_layers(model)
    hidden = int(getattr(model.config, "hidden_size", 0))
    ptr = next(model.parameters())
    per_token = hidden * ptr.element_size()
    acts, batch = calibration.numel() * per_token, min(batch_size, calibration.shape[0]) * calibration.shape[1] * per_token
    need = max(layer_need_bytes(sum(p.numel() * p.element_size() for p in layer.parameters()),
                                [lin.in_features for lin in prunable_modules(layer).values()], acts, batch)
               for layer in layers)
    return offload_needed(device, gpu_memory, need)
