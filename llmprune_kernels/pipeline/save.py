"""Save a (pruned) model as a ``save_pretrained`` directory, atomically.

Everything is written into a hidden temporary sibling of the target and renamed into place only at
the end (:mod:`llmprune_kernels.atomic`), so an interrupted or failed run never leaves a half-written
result under the target name, and a killed run's leftovers are cleaned up by the next one.
The result is plain safetensors + config + tokenizer files that stock ``transformers`` loads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from llmprune_kernels.atomic import atomic_dir, resolve_target


def _strip_load_only_config(model: nn.Module) -> None:
    """Drop the GGUF ``quantization_config`` a dequantized GGUF model carries.

    The weights are plain floating point once dequantized; leaving the entry in config.json would make
    ``from_pretrained`` look for a GGUF file that is not there.
    """
    config = getattr(model, "config", None)
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(method).lower().endswith("gguf"):
        del config.quantization_config
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None


def save_model(
    model: nn.Module,
    tokenizer: Any,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    extra_json: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` to ``output_dir`` via a temporary sibling + rename.

    ``overwrite=False`` refuses an existing target (FileExistsError), also one created while this one was
    being written; ``overwrite=True`` replaces it only after the new directory is complete. Another live
    writer of the same target raises ``atomic.TargetBusyError`` before anything is written; to fail before
    the work that produces the model, hold ``atomic.reserve(output_dir, overwrite=..., kind="dir")``
    around it. ``extra_json`` maps file names to objects written as JSON beside the weights; a pruning
    report given as ``pruning_report.json`` (``report.REPORT_FILE``) also gives the directory its model card,
    README.md (``pipeline.model_card``). Returns the final path.
    """
    from llmprune_kernels.pipeline.model_card import write_card
    from llmprune_kernels.pipeline.report import REPORT_FILE

    extra = {name: json.dumps(obj, indent=2, default=str) + "\n" for name, obj in (extra_json or {}).items()}
    out = resolve_target(output_dir)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _strip_load_only_config(model)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in extra.items():
            (tmp / name).write_text(text)
        if REPORT_FILE in (extra_json or {}):
            write_card(tmp, extra_json[REPORT_FILE])
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError(f"save_pretrained wrote no .safetensors file into {tmp}")
    return out
