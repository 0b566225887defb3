"""Compressed 2:4 checkpoints: one safetensors file holding packed values + metadata per SparseLinear.

A model's ``state_dict`` after ``sparsify_`` already is the compressed format (``<fqn>.values``,
``<fqn>.meta``, ``<fqn>.bias``; 8-bit modules also ``<fqn>.scale``); the file's string metadata names those
modules with their dense shape and dtype (8-bit ones also ``weight_dtype``, ``group_size``, ``scale_dtype``:
:mod:`llmprune_kernels.sparse24.quant8`, and the opted-in ``activations``, absent in older files: ``16bit``), and
records tied tensors (``aliases``) that safetensors cannot store
twice.

* ``save_compressed(model, dir)`` -> ``dir/model.sparse24.safetensors`` (+ ``config.json`` when the model
  has a transformers config); written through :mod:`llmprune_kernels.atomic`, never half-written.
* ``load_compressed(model, dir)`` swaps the named Linears for ``SparseLinear`` and loads bit for bit.
* ``expand_to_dense(dir, out_dir)`` writes a dense ``model.safetensors`` + config that plain
  ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads.

Reads check the whole file before they allocate anything or touch the model (metadata schema, declared
shapes and dtypes against the stored tensors, names against the model): a malformed checkpoint raises
:class:`CheckpointError` naming the file and the field, and leaves the model as it was.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from llmprune_kernels.atomic import atomic_dir, resolve_target
from llmprune_kernels.sparse24.pack import Packed24, meta_width, unpack_24
from llmprune_kernels.sparse24.quant8 import (ACTIVATIONS, SCALE_DTYPES, WEIGHT_DTYPES, Packed24Q8, check_group_size,
                                              dequantize_24, n_groups)

FORMAT = "llmprune_sparse24"
VERSION = "1"
FILENAME = "model.sparse24.safetensors"
DENSE_FILENAME = "model.safetensors"
DTYPES = ("float16", "bfloat16", "float32", "float64")  # allowed SparseLinear value dtypes
Q8_KEYS = ("weight_dtype", "group_size", "scale_dtype")  # the fields 8-bit modules add
_ST_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A compressed checkpoint that is malformed or does not fit the model; the message names the file and
    the field. Raised before any tensor is allocated or the model is changed."""


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


def _info(m: nn.Module) -> dict:
    """A SparseLinear's metadata entry: shape, compute dtype, bias (8-bit modules: and their format)."""
    from llmprune_kernels.sparse24.linear8 import SparseLinear8

    name = lambda dt: str(dt).removeprefix("torch.")  # noqa: E731
    if not isinstance(m, SparseLinear8):
        return {"shape": [m.out_features, m.in_features], "dtype": name(m.values.dtype), "bias": m.bias is not None}
    return {"shape": [m.out_features, m.in_features], "dtype": name(m.compute_dtype), "bias": m.bias is not None,
            "weight_dtype": m.weight_dtype, "group_size": m.group_size, "scale_dtype": name(m.scale.dtype),
            "activations": m.activations}


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, *, overwrite: bool = False, tokenizer=None,
                    extra_json: dict | None = None) -> str:
    """Save a sparsified model (SparseLinear modules packed) to ``out_dir``; returns the file path.

    An existing ``out_dir`` is refused (FileExistsError) unless ``overwrite=True``, which replaces it
    only once the new checkpoint is complete. ``tokenizer`` (``save_pretrained``) and ``extra_json`` (file
    name -> object, written as JSON) are saved beside it, in the same atomic write."""
    from llmprune_kernels.sparse24.linear import SparseLinear

    sparse = {fqn: _info(m) for fqn, m in model.named_modules() if isinstance(m, SparseLinear)}
    if not sparse:
        raise ValueError("save_compressed: the model has no SparseLinear module, so there is nothing to compress; "
                         "prune it 2:4 and call sparsify_(model) first, or save it dense with save_model")
    tensors, aliases = _dedupe(model.state_dict())
    meta = {"format": FORMAT, "version": VERSION, "sparse24": json.dumps(sparse), "aliases": json.dumps(aliases)}
    target = resolve_target(out_dir)
    with atomic_dir(target, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / FILENAME), metadata=meta)
        if getattr(model, "config", None) is not None and hasattr(model.config, "save_pretrained"):
            model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return str(target / FILENAME)


@dataclass
class _Header:
    """What a checkpoint file declares and stores, read without loading a tensor."""

    file: str
    sparse: dict[str, dict]  # fqn -> {"shape": [out, in], "dtype": str, "bias": bool[, Q8_KEYS]}
    aliases: dict[str, str]  # tied name -> stored name
    stored: dict[str, tuple[tuple[int, ...], torch.dtype]]  # stored name -> (shape, dtype)


def _file_of(path: str | os.PathLike) -> str:
    path = os.path.expanduser(os.fspath(path))
    return os.path.join(path, FILENAME) if os.path.isdir(path) else path


def _json_field(file: str, meta: dict, key: str) -> object:
    if key not in meta:
        raise CheckpointError(f"{file}: metadata field {key!r} is missing; a {FORMAT} checkpoint has "
                              f"'format', 'version', 'sparse24' and 'aliases'")
    try:
        return json.loads(meta[key])
    except ValueError as exc:
        raise CheckpointError(f"{file}: metadata field {key!r} is not valid JSON ({exc})") from None


def _check_info(file: str, fqn: object, info: object) -> None:
    where = f"{file}: sparse24[{fqn!r}]"
    if not isinstance(fqn, str) or not fqn or fqn.startswith(".") or fqn.endswith("."):
        raise CheckpointError(f"{where}: the module name must be a non-empty dotted name")
    base, q8 = {"shape", "dtype", "bias"}, {"shape", "dtype", "bias", *Q8_KEYS}
    if not isinstance(info, dict) or set(info) not in (base, q8, q8 | {"activations"}):
        raise CheckpointError(f"{where} is {info!r}; allowed: an object with exactly 'shape', 'dtype', 'bias' "
                              f"(8-bit weights: and {', '.join(repr(k) for k in Q8_KEYS)}, optionally 'activations')")
    shape = info["shape"]
    if (not isinstance(shape, list) or len(shape) != 2 or any(type(d) is not int or d <= 0 for d in shape)
            or shape[1] % 4):
        raise CheckpointError(f"{where}.shape is {shape!r}; allowed: [out_features, in_features], positive "
                              f"integers, in_features a multiple of 4")
    if info["dtype"] not in DTYPES:
        raise CheckpointError(f"{where}.dtype is {info['dtype']!r}; allowed: {', '.join(DTYPES)}")
    if type(info["bias"]) is not bool:
        raise CheckpointError(f"{where}.bias is {info['bias']!r}; allowed: true or false")
    if "weight_dtype" not in info:
        return
    if info["weight_dtype"] not in WEIGHT_DTYPES:
        raise CheckpointError(f"{where}.weight_dtype is {info['weight_dtype']!r}; allowed: {', '.join(WEIGHT_DTYPES)}")
    if info["scale_dtype"] not in SCALE_DTYPES:
        raise CheckpointError(f"{where}.scale_dtype is {info['scale_dtype']!r}; allowed: {', '.join(SCALE_DTYPES)}")
    if info["dtype"] not in ("float16", "bfloat16", "float32"):
        raise CheckpointError(f"{where}.dtype is {info['dtype']!r}; allowed with 8-bit weights: float16, bfloat16, "
                              f"float32")
    try:
        check_group_size(info["group_size"])
    except ValueError as exc:
        raise CheckpointError(f"{where}.group_size: {exc}") from None
    if info.get("activations", "16bit") not in ACTIVATIONS:
        raise CheckpointError(f"{where}.activations is {info['activations']!r}; allowed: {', '.join(ACTIVATIONS)}")


def _expect(h: _Header, name: str, shape: tuple[int, ...], dtype: torch.dtype, field: str) -> None:
    """The stored tensor ``name`` must exist with this shape and dtype (what ``field`` declares)."""
    if name not in h.stored:
        raise CheckpointError(f"{h.file}: {field} declares tensor {name!r}, which the file does not store")
    got = h.stored[name]
    if got != (shape, dtype):
        raise CheckpointError(f"{h.file}: tensor {name!r} is stored as {list(got[0])} {got[1]}; {field} "
                              f"declares {list(shape)} {dtype}")


def _read_header(path: str | os.PathLike) -> _Header:
    """Validate the file's metadata against its stored tensors (shapes, dtypes, sizes); loads no tensor."""
    file = _file_of(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"compressed checkpoint {file!r} does not exist; give a directory written by "
                                f"save_compressed or its {FILENAME}")
    try:
        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
            stored = {}
            for k in f.keys():
                sl = f.get_slice(k)
                stored[k] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype()))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError (and others)
        raise CheckpointError(f"{file}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a {FORMAT} checkpoint (metadata field 'format' is "
                              f"{meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{file}: metadata field 'version' is {meta.get('version')!r}; this code reads {VERSION}")
    sparse, aliases = _json_field(file, meta, "sparse24"), _json_field(file, meta, "aliases")
    if not isinstance(sparse, dict) or not sparse:
        raise CheckpointError(f"{file}: metadata field 'sparse24' is {sparse!r}; allowed: a non-empty object "
                              f"of module name -> {{shape, dtype, bias}}")
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CheckpointError(f"{file}: metadata field 'aliases' is {aliases!r}; allowed: an object of "
                              f"tensor name -> stored tensor name")
    for name, (shape, dtype) in stored.items():
        if dtype is None:
            raise CheckpointError(f"{file}: tensor {name!r} has a dtype this format does not use; allowed: "
                                  f"{', '.join(_ST_DTYPES)}")
    h = _Header(file, sparse, aliases, stored)
    size = os.path.getsize(file)
    need = sum(torch.Size(s).numel() * d.itemsize for s, d in stored.values())
    if need > size:
        raise CheckpointError(f"{file}: the stored tensors need {need} bytes, the file has {size}")
    for fqn, info in sparse.items():
        _check_info(file, fqn, info)
        out_f, in_f = info["shape"]
        dtype, field = getattr(torch, info["dtype"]), f"sparse24[{fqn!r}]"
        qdtype = WEIGHT_DTYPES[info["weight_dtype"]] if "weight_dtype" in info else dtype
        _expect(h, f"{fqn}.values", (out_f, in_f // 2), qdtype, field)
        _expect(h, f"{fqn}.meta", (out_f, meta_width(in_f)), torch.uint8, field)
        if "weight_dtype" in info:
            _expect(h, f"{fqn}.scale", (out_f, n_groups(in_f, info["group_size"])), SCALE_DTYPES[info["scale_dtype"]],
                    field)
        if info["bias"]:
            _expect(h, f"{fqn}.bias", (out_f,), dtype, field)
        elif f"{fqn}.bias" in stored:
            raise CheckpointError(f"{file}: tensor {fqn + '.bias'!r} is stored but {field}.bias is false")
    for alias, kept in aliases.items():
        if kept not in stored or alias in stored:
            raise CheckpointError(f"{file}: aliases[{alias!r}] = {kept!r}; allowed: a tensor name the file does "
                                  f"not store -> one it stores")
    return h


def _load_tensors(h: _Header) -> dict[str, torch.Tensor]:
    try:
        with safe_open(h.file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in h.stored}
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{h.file}: tensor data unreadable ({type(exc).__name__}: {exc})") from None


def read_compressed(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, str]]:
    """``(state_dict, {fqn: {shape, dtype, bias}}, aliases)`` of a compressed checkpoint file or directory
    (validated first: CheckpointError names the file and the field)."""
    h = _read_header(path)
    return _load_tensors(h), h.sparse, h.aliases


def _plan(model: nn.Module, h: _Header) -> list[tuple[nn.Module, str, nn.Module, dict]]:
    """Check the checkpoint against the model: ``(parent, child, old module, info)`` per swap, or
    CheckpointError. Touches nothing."""
    from llmprune_kernels.sparse24.linear import SparseLinear

    swaps, expected = [], {}
    for fqn, info in h.sparse.items():
        parent_name, _, child = fqn.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            parent = None
        old = getattr(parent, child, None) if parent is not None else None
        field = f"{h.file}: sparse24[{fqn!r}]"
        if not isinstance(old, (nn.Linear, SparseLinear)):
            raise CheckpointError(f"{field}: the model has no Linear {fqn!r} (found {type(old).__name__}); "
                                  f"load into a model of the architecture that was saved")
        out_f, in_f = info["shape"]
        if (old.out_features, old.in_features) != (out_f, in_f) or (old.bias is not None) != info["bias"]:
            raise CheckpointError(f"{field}: declares [{out_f}, {in_f}] bias={info['bias']}; the model's module "
                                  f"is [{old.out_features}, {old.in_features}] bias={old.bias is not None}")
        swaps.append((parent, child, old, info))
    swapped = tuple(f"{fqn}." for fqn in h.sparse)
    for k, t in model.state_dict().items():
        if not k.startswith(swapped):
            expected[k] = t
    for fqn, info in h.sparse.items():
        for suffix in ("values", "meta") + (("scale",) if "weight_dtype" in info else ()) + (
                ("bias",) if info["bias"] else ()):
            expected[f"{fqn}.{suffix}"] = None  # checked against the declaration in _read_header
    have = set(h.stored) | set(h.aliases)
    if set(expected) - have:
        missing = sorted(set(expected) - have)
        raise CheckpointError(f"{h.file}: model tensors missing from the checkpoint: {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}")
    if have - set(expected):
        extra = sorted(have - set(expected))
        raise CheckpointError(f"{h.file}: checkpoint tensors not in the model: {extra[:5]}"
                              f"{'...' if len(extra) > 5 else ''}")
    for k, t in expected.items():
        if t is None:
            continue
        shape, dtype = h.stored[h.aliases.get(k, k)]
        if shape != tuple(t.shape) or (dtype != t.dtype and not (dtype.is_floating_point and t.is_floating_point)):
            raise CheckpointError(f"{h.file}: tensor {k!r} is stored as {list(shape)} {dtype}; the model's is "
                                  f"{list(t.shape)} {t.dtype}")
    return swaps


@torch.no_grad()
def load_compressed(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Swap the checkpoint's SparseLinear modules into ``model`` (same architecture) and load every tensor.

    The checkpoint is checked against its own metadata and the model first, and the replacement modules
    are built before any is swapped in: on CheckpointError the model is unchanged."""
    from llmprune_kernels.sparse24.linear import SparseLinear
    from llmprune_kernels.sparse24.linear8 import SparseLinear8

    h = _read_header(path)
    swaps = _plan(model, h)
    state = _load_tensors(h)
    for alias, kept in h.aliases.items():
        state[alias] = state[kept]
    built = []
    for parent, child, old, info in swaps:
        out_f, in_f = info["shape"]
        dev = next((t.device for t in old.buffers()), None) or next((t.device for t in old.parameters()), "cpu")
        kw = dict(bias=info["bias"], device=dev, dtype=getattr(torch, info["dtype"]))
        if "weight_dtype" in info:
            built.append(SparseLinear8(in_f, out_f, **kw, **{k: info[k] for k in Q8_KEYS}))
            built[-1].activations = info.get("activations", "16bit")
        else:
            built.append(SparseLinear(in_f, out_f, **kw))
    try:
        for (parent, child, _, _), new in zip(swaps, built):
            setattr(parent, child, new)
        model.load_state_dict(state, strict=True)
    except BaseException:
        for parent, child, old, _ in swaps:  # cannot happen after the checks above; undo the swap anyway
            setattr(parent, child, old)
        raise
    return model


def dense_state_dict(path: str | os.PathLike, with_aliases: bool = True) -> dict[str, torch.Tensor]:
    """The checkpoint with every packed weight expanded to ``<fqn>.weight`` (tied aliases restored as copies
    unless ``with_aliases=False``)."""
    state, sparse, aliases = read_compressed(path)
    for fqn, info in sparse.items():
        packed = Packed24(state.pop(f"{fqn}.values"), state.pop(f"{fqn}.meta"), tuple(info["shape"]))
        if "weight_dtype" in info:  # 8-bit: the dequantised weight in the compute dtype
            q = Packed24Q8(packed.values, packed.meta, state.pop(f"{fqn}.scale"), packed.shape, info["group_size"])
            packed = dequantize_24(q, getattr(torch, info["dtype"]))
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


def expand_to_dense(path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write a dense ``save_pretrained``-style directory (``model.safetensors`` + config) from a compressed one.

    Tied tensors (e.g. ``lm_head.weight`` sharing the embedding) are stored once when the config ties them,
    as ``save_pretrained`` does: transformers re-ties them on load. An existing ``out_dir`` is refused
    unless ``overwrite=True``; ``out_dir`` may not be, contain or lie inside the source directory."""
    file = Path(_file_of(path)).resolve()
    src_dir, target = file.parent, resolve_target(out_dir)
    if target == src_dir or src_dir in target.parents or target in src_dir.parents:
        raise ValueError(f"expand_to_dense: out_dir {str(target)!r} overlaps the compressed checkpoint's "
                         f"directory {str(src_dir)!r}; allowed: a directory outside it")
    state = dense_state_dict(file, with_aliases=not _tied_in_config(str(src_dir)))
    with atomic_dir(target, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / DENSE_FILENAME), metadata={"format": "pt"})
        for name in ("config.json", "generation_config.json"):
            if (src_dir / name).exists():
                shutil.copy(src_dir / name, tmp / name)
    return str(target / DENSE_FILENAME)


def from_pretrained_compressed(path: str | os.PathLike, device="cpu") -> nn.Module:
    """Build the transformers model from the directory's ``config.json`` and load the compressed weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.path.expanduser(os.fspath(path))
    h = _read_header(path)
    dtype = getattr(torch, next(iter(h.sparse.values()))["dtype"])
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return load_compressed(model, path).to(device)
