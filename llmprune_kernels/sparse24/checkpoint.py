"""Compressed 2:4 checkpoints: one safetensors file holding packed values + metadata per SparseLinear.

A model's ``state_dict`` after ``sparsify_`` already is the compressed format (``<fqn>.values``,
``<fqn>.meta``, ``<fqn>.bias``); the file's string metadata names those modules with their dense
shape and dtype, and records tied tensors (``aliases``) that safetensors cannot store twice.

* ``save_compressed(model, dir)`` -> ``dir/model.sparse24.safetensors`` (+ ``config.json`` when the model
  has a transformers config); written to a temporary directory and renamed, never half-written.
* ``load_compressed(model, dir)`` swaps the named Linears for ``SparseLinear`` and loads bit for bit.
* ``expand_to_dense(dir, out_dir)`` writes a dense ``model.safetensors`` + config that plain
  ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from llmprune_kernels.sparse24.pack import Packed24, unpack_24

FORMAT = "llmprune_sparse24"
VERSION = "1"
FILENAME = "model.sparse24.safetensors"
DENSE_FILENAME = "model.safetensors"


def _atomic_dir(out_dir: str):
    """A fresh temp directory beside ``out_dir``; ``_commit`` renames it into place."""
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=".tmp_" + os.path.basename(out_dir) + "_", dir=parent)


def _commit(tmp: str, out_dir: str) -> None:
    if os.path.exists(out_dir):
        old = tmp + ".old"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share memory with an earlier one (tied embeddings); return alias -> kept name."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out, aliases


def save_compressed(model: nn.Module, out_dir: str) -> str:
    """Save a sparsified model (SparseLinear modules packed) to ``out_dir``; returns the file path."""
    from llmprune_kernels.sparse24.linear import SparseLinear

    sparse = {fqn: {"shape": [m.out_features, m.in_features], "dtype": str(m.values.dtype).removeprefix("torch."),
                    "bias": m.bias is not None}
              for fqn, m in model.named_modules() if isinstance(m, SparseLinear)}
    if not sparse:
        raise ValueError("save_compressed: the model has no SparseLinear module, so there is nothing to compress; "
                         "prune it 2:4 and call sparsify_(model) first, or save it dense with save_model")
    tensors, aliases = _dedupe(model.state_dict())
    meta = {"format": FORMAT, "version": VERSION, "sparse24": json.dumps(sparse), "aliases": json.dumps(aliases)}
    tmp = _atomic_dir(out_dir)
    try:
        save_file(tensors, os.path.join(tmp, FILENAME), metadata=meta)
        if getattr(model, "config", None) is not None and hasattr(model.config, "save_pretrained"):
            model.config.save_pretrained(tmp)
        _commit(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(out_dir, FILENAME)


def read_compressed(path: str) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, str]]:
    """``(state_dict, {fqn: {shape, dtype, bias}}, aliases)`` of a compressed checkpoint file or directory."""
    if os.path.isdir(path):
        path = os.path.join(path, FILENAME)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} checkpoint (format={meta.get('format')!r})")
        if meta.get("version") != VERSION:
            raise ValueError(f"{path} has {FORMAT} version {meta.get('version')!r}; this code reads {VERSION}")
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, json.loads(meta["sparse24"]), json.loads(meta["aliases"])


@torch.no_grad()
def load_compressed(model: nn.Module, path: str) -> nn.Module:
    """Swap the checkpoint's SparseLinear modules into ``model`` (same architecture) and load every tensor."""
    from llmprune_kernels.sparse24.linear import SparseLinear

    state, sparse, aliases = read_compressed(path)
    for fqn, info in sparse.items():
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        out_f, in_f = info["shape"]
        dev = next((t.device for t in old.parameters()), torch.device("cpu")) if isinstance(old, nn.Module) else "cpu"
        new = SparseLinear(in_f, out_f, bias=info["bias"], device=dev, dtype=getattr(torch, info["dtype"]))
        setattr(parent, child, new)
    for alias, kept in aliases.items():
        state.setdefault(alias, state[kept])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint tensors not in the model: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    if missing:
        raise ValueError(f"model tensors missing from the checkpoint: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return model


def dense_state_dict(path: str, with_aliases: bool = True) -> dict[str, torch.Tensor]:
    """The checkpoint with every packed weight expanded to ``<fqn>.weight`` (tied aliases restored as copies
    unless ``with_aliases=False``)."""
    state, sparse, aliases = read_compressed(path)
    for fqn, info in sparse.items():
        packed = Packed24(state.pop(f"{fqn}.values"), state.pop(f"{fqn}.meta"), tuple(info["shape"]))
        state[f"{fqn}.weight"] = unpack_24(packed)
    for alias, kept in aliases.items() if with_aliases else ():
        state.setdefault(alias, state[kept].clone())
    return state


def _tied_in_config(src_dir: str) -> bool:
    """Whether the checkpoint's transformers config ties the output embedding to the input one (its default)."""
    cfg = os.path.join(src_dir, "config.json")
    if not os.path.exists(cfg):
        return False
    with open(cfg) as f:
        return bool(json.load(f).get("tie_word_embeddings", True))


def expand_to_dense(path: str, out_dir: str) -> str:
    """Write a dense ``save_pretrained``-style directory (``model.safetensors`` + config) from a compressed one.

    Tied tensors (e.g. ``lm_head.weight`` sharing the embedding) are stored once when the config ties them,
    as ``save_pretrained`` does: transformers re-ties them on load."""
    src_dir = path if os.path.isdir(path) else os.path.dirname(path)
    state = dense_state_dict(path, with_aliases=not _tied_in_config(src_dir))
    tmp = _atomic_dir(out_dir)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, DENSE_FILENAME),
                  metadata={"format": "pt"})
        for name in ("config.json", "generation_config.json"):
            if os.path.exists(os.path.join(src_dir, name)):
                shutil.copy(os.path.join(src_dir, name), os.path.join(tmp, name))
        _commit(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(out_dir, DENSE_FILENAME)


def from_pretrained_compressed(path: str, device="cpu") -> nn.Module:
    """Build the transformers model from the directory's ``config.json`` and load the compressed weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    state_file = os.path.join(path, FILENAME)
    with safe_open(state_file, framework="pt") as f:
        sparse = json.loads(f.metadata()["sparse24"])
    dtype = getattr(torch, next(iter(sparse.values()))["dtype"]) if sparse else torch.float32
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return load_compressed(model, path).to(device)
