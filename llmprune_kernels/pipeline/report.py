"""The JSON report of a pruning run: what was pruned, how, how well, how fast, on what software."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

from llmprune_kernels.atomic import atomic_file, resolve_target
from llmprune_kernels.backends import backends

REPORT_VERSION = 1
# The report's name inside an output directory; save_model and prune_pretrained also write the model card
# (README.md, pipeline.model_card) from the report given under this name.
REPORT_FILE = "pruning_report.json"


def versions() -> dict[str, str | None]:
    """Versions of the packages a result depends on (None when not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda}
    for pkg in ("llmprune_kernels", "transformers", "triton", "safetensors", "gguf", "accelerate", "tokenizers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def host() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def build_report(
    *,
    model: str,
    method: str | None,
    options: dict[str, Any] | None = None,
    sparsity: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    prune_result: Any = None,
    dense_ppl: float | None = None,
    pruned_ppl: float | None = None,
    timings: dict[str, float] | None = None,
    output_dir: str | None = None,
    zero_shot: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the report dict (``prune_result`` is a ``pipeline.PruneResult`` or None).

    ``zero_shot``: ``{"dense": ..., "pruned": ...}``, each a ``pipeline.zeroshot.zero_shot`` result or None.
    """
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "method": method,
        "options": options or {},
        "sparsity": sparsity,
        "data": data or {},
        "perplexity": {"dense": dense_ppl, "pruned": pruned_ppl},
        "zero_shot": zero_shot,
        "timings_s": timings or {},
        "output_dir": output_dir,
        "backends": backends(),
        "versions": versions(),
        "host": host(),
    }
    if prune_result is not None:
        d = prune_result.to_dict()
        report["overall_sparsity"] = d["overall_sparsity"]
        report["linears"] = d["linears"]
        report["layer_times_s"] = d["layer_times_s"]
        report["stage_times_s"] = d.get("stage_times_s") or {}  # load, capture, statistics, solve, ...
        report["uses_calibration"] = bool(d.get("uses_calibration", True))
        if any("expert" in line.get("extra", {}) for line in d["linears"]):  # an MoE model's expert rule
            report["min_expert_tokens"] = d.get("min_expert_tokens")
        if d.get("method_report") is not None:  # model-level methods (GBLM, SparseLLM) summarise themselves
            report["method_report"] = d["method_report"]
        report["timings_s"].setdefault("capture", d["capture_time_s"])
        report["timings_s"].setdefault("prune", d["total_time_s"])
    return report


def write_json(obj: Any, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write JSON via a temporary sibling and an atomic rename (never a truncated report).

    ``overwrite=True`` (the default: reports, manifests and caches are rewritten in place) replaces an
    existing file; ``overwrite=False`` refuses it (FileExistsError). The object is serialised first, so a
    value JSON cannot hold fails before anything is written.
    """
    text = json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False) + "\n"
    target = resolve_target(path)
    with atomic_file(target, overwrite=overwrite) as tmp:
        tmp.write_text(text)
    return target


def _finite(obj: Any) -> Any:
    """Strict JSON has no NaN/Infinity: write them as the strings "nan", "inf", "-inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() <= 64 else f"tensor{tuple(obj.shape)}"
    return repr(obj)
