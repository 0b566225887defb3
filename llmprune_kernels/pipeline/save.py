"""Save a (pruned) model as a ``save_pretrained`` directory, atomically.

Everything is written into a hidden temporary sibling of the target and renamed into place only at
the end, so an interrupted or failed run never leaves a half-written result under the target name.
The result is plain safetensors + config + tokenizer files that stock ``transformers`` loads.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from torch import nn


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

    ``overwrite=False`` refuses an existing target; ``overwrite=True`` replaces it only after the new
    directory is complete. ``extra_json`` maps file names to objects written as JSON beside the weights
    (e.g. the pruning report). Returns the final path.
    """
    out = Path(output_dir).expanduser().resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {str(out)!r} already exists; pass overwrite=True (CLI: --overwrite)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {str(out)!r} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    old = out.parent / f".{out.name}.old-{tag}"
    _strip_load_only_config(model)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError(f"save_pretrained wrote no .safetensors file into {tmp}")
        if out.exists():
            # Two renames instead of rmtree-then-rename: the target name never points at a partial tree.
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out
