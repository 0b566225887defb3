"""Compressed 2:4 checkpoints: writers never replace what they were not asked to; loads check the file
against its metadata and the model before they allocate or change anything (fuzzed with hypothesis)."""
from __future__ import annotations

import copy
import json
import os
import struct

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import random_ids, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from llmprune_kernels.sparse24 import SparseLinear, sparsify_
from llmprune_kernels.sparse24.checkpoint import (
    FILENAME, CheckpointError, expand_to_dense, load_compressed, save_compressed,
)
from llmprune_kernels.testing import random_24_weight


def dense_model(seed: int = 0) -> nn.Module:
    """Tiny Qwen2 (biases on q/k/v) with a tied head, its layer Linears pruned 2:4."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen2")
    cfg.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and "layers" in name:
                mod.weight.copy_(random_24_weight(*mod.weight.shape, torch.float32))
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``(directory, its safetensors bytes, the sparsified model)``, written once for this module."""
    model = sparsify_(dense_model())
    ck = tmp_path_factory.mktemp("ck") / "ck"
    save_compressed(model, ck)
    return ck, (ck / FILENAME).read_bytes(), model


@pytest.fixture(scope="module")
def base_model():
    return dense_model(seed=1)


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------- writers
def test_save_compressed_refuses_an_existing_directory(tmp_path, checkpoint):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("unrelated")
    with pytest.raises(FileExistsError, match=r"already exists; pass overwrite=True"):
        save_compressed(checkpoint[2], target)
    assert sorted(os.listdir(target)) == ["notes.txt"] and _leftovers(tmp_path) == []
    save_compressed(checkpoint[2], target, overwrite=True)
    assert sorted(os.listdir(target)) == ["config.json", FILENAME] and _leftovers(tmp_path) == []


def test_save_compressed_refuses_an_existing_file_and_leaves_nothing(tmp_path, checkpoint):
    target = tmp_path / "file"
    target.write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
            save_compressed(checkpoint[2], target, overwrite=overwrite)
    assert target.read_text() == "keep me" and _leftovers(tmp_path) == []


def test_expand_to_dense_refuses_its_own_source(tmp_path, checkpoint):
    ck = tmp_path / "ck"
    save_compressed(checkpoint[2], ck)
    before = (ck / FILENAME).read_bytes()
    for out in (ck, ck / "dense", tmp_path):
        with pytest.raises(ValueError, match="overlaps the compressed checkpoint"):
            expand_to_dense(ck, out, overwrite=True)
    assert (ck / FILENAME).read_bytes() == before and sorted(os.listdir(ck)) == ["config.json", FILENAME]
    (tmp_path / "dense").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        expand_to_dense(ck, tmp_path / "dense")
    assert os.listdir(tmp_path / "dense") == []


def test_save_compressed_expands_home(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    out = save_compressed(checkpoint[2], "~/ck")
    assert out == str(tmp_path / "home" / "ck" / FILENAME) and os.path.isfile(out)
    assert not (tmp_path / "~").exists()


# --------------------------------------------------------------------------------------------- loads
class _Overallocation(BaseException):
    """Raised by AllocGuard; a BaseException so no ``except Exception`` in the code under test hides it."""


class AllocGuard(TorchDispatchMode):
    """Refuse, before it happens, any single allocation larger than ``limit`` bytes."""

    FACTORIES = {"empty", "zeros", "ones", "full", "empty_strided", "new_empty", "new_zeros", "new_full",
                 "new_ones", "randn", "rand"}

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self.FACTORIES:
            size = args[1] if name.startswith("new_") else args[0]
            ref = args[0] if name.startswith("new_") else None
            dtype = kwargs.get("dtype") or (ref.dtype if ref is not None else torch.get_default_dtype())
            nbytes = torch.Size(size).numel() * dtype.itemsize
            if nbytes > self.limit:
                raise _Overallocation(f"{func} asked for {nbytes} bytes; the file has {self.limit}")
        return func(*args, **kwargs)


def snapshot(model: nn.Module):
    return ({n: m for n, m in model.named_modules()},
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def assert_unchanged(model: nn.Module, snap) -> None:
    modules, state = snap
    assert {n: m for n, m in model.named_modules()} == modules  # the same module objects, none swapped
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())


def _rewrite(raw: bytes, edit) -> bytes:
    """The safetensors bytes with ``edit(header)`` applied to its JSON header, tensor data untouched."""
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def _edit_meta(key, fn):
    def edit(header):
        meta = header["__metadata__"]
        meta[key] = json.dumps(fn(json.loads(meta[key])))
    return edit


def _load_expect_error(tmp_path, data: bytes, match: str | None = None) -> CheckpointError:
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    (d / FILENAME).write_bytes(data)
    model = dense_model(seed=1)
    snap = snapshot(model)
    with AllocGuard(len(data)), pytest.raises(CheckpointError, match=match) as info:
        load_compressed(model, d)
    assert str(d / FILENAME) in str(info.value)
    assert_unchanged(model, snap)
    return info.value


MODULE = "model.layers.0.mlp.down_proj"


def test_declared_shape_is_checked_against_the_stored_tensors_before_allocating(tmp_path, checkpoint):
    # 2**17 x 2**17 fp32 would be a 32 GiB weight from a file of a few hundred KB
    huge = _rewrite(checkpoint[1], _edit_meta("sparse24", lambda s: {**s, MODULE: {**s[MODULE], "shape": [2**17] * 2}}))
    _load_expect_error(tmp_path, huge, rf"{MODULE}.values.*stored as \[64, 48\].*declares \[131072, 65536\]")


@pytest.mark.parametrize("key, value, match", [
    ("sparse24", "{not json", r"'sparse24' is not valid JSON"),
    ("sparse24", "[1, 2]", r"'sparse24' is \[1, 2\]; allowed: a non-empty object"),
    ("aliases", '{"lm_head.weight": 3}', r"'aliases' .*allowed: an object of tensor name"),
    ("aliases", '{"lm_head.weight": "nope"}', r"aliases\['lm_head.weight'\] = 'nope'"),
    ("version", "2", r"'version' is '2'; this code reads 1"),
    ("format", None, r"not a llmprune_sparse24 checkpoint"),
])
def test_malformed_metadata_names_the_file_and_field(tmp_path, checkpoint, key, value, match):
    def edit(header):
        if value is None:
            del header["__metadata__"][key]
        else:
            header["__metadata__"][key] = value
    _load_expect_error(tmp_path, _rewrite(checkpoint[1], edit), match)


@pytest.mark.parametrize("field, value, match", [
    ("shape", "64x192", r"\.shape is '64x192'; allowed: \[out_features, in_features\]"),
    ("shape", [64, 190], r"\.shape is \[64, 190\]"),
    ("dtype", "int8", r"\.dtype is 'int8'; allowed: float16"),
    ("dtype", "float16", r"stored as \[64, 48\] torch.float32; sparse24.* declares \[64, 48\] torch.float16"),
    ("bias", "yes", r"\.bias is 'yes'; allowed: true or false"),
    ("bias", True, r"declares tensor '.*down_proj.bias', which the file does not store"),
])
def test_malformed_module_entry_names_the_field(tmp_path, checkpoint, field, value, match):
    edit = _edit_meta("sparse24", lambda s: {**s, MODULE: {**s[MODULE], field: value}})
    _load_expect_error(tmp_path, _rewrite(checkpoint[1], edit), match)


def test_a_checkpoint_of_another_architecture_leaves_the_model_unchanged(tmp_path, checkpoint):
    ck, _, _ = checkpoint
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen2")
    cfg.tie_word_embeddings, cfg.num_hidden_layers = True, 1  # the checkpoint's second layer has no home
    model = AutoModelForCausalLM.from_config(cfg).eval()
    snap, ids = snapshot(model), random_ids(1, 8)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    with pytest.raises(CheckpointError, match=r"sparse24\['model.layers.1.*the model has no Linear"):
        load_compressed(model, ck)
    assert_unchanged(model, snap)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)


def test_an_extra_tensor_leaves_the_model_unchanged(tmp_path, checkpoint):
    ck, _, sparse = checkpoint
    with safe_open(str(ck / FILENAME), framework="pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file({**state, "model.extra": torch.zeros(3)}, str(tmp_path / "x.safetensors"), metadata=meta)
    _load_expect_error(tmp_path, (tmp_path / "x.safetensors").read_bytes(), r"not in the model: \['model.extra'\]")


def test_valid_checkpoint_still_loads_bit_for_bit(tmp_path, checkpoint):
    ck, raw, sparse = checkpoint
    model = dense_model(seed=1)
    with AllocGuard(len(raw)):
        load_compressed(model, ck)
    assert isinstance(model.model.layers[1].self_attn.q_proj, SparseLinear)
    ids = random_ids(2, 8)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, sparse(input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------- fuzz
def _mutate(data, raw: bytes) -> bytes:
    """One random corruption of a valid checkpoint's bytes, drawn from hypothesis ``data``."""
    kind = data.draw(st.sampled_from(["meta", "module", "tensor", "flip", "truncate"]), label="kind")
    if kind == "flip":
        pos = data.draw(st.integers(0, len(raw) - 1), label="byte")
        bit = data.draw(st.integers(0, 7), label="bit")
        return raw[:pos] + bytes([raw[pos] ^ (1 << bit)]) + raw[pos + 1:]
    if kind == "truncate":
        return raw[:data.draw(st.integers(0, len(raw) - 1), label="length")]
    junk = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.text(max_size=8),
                     st.lists(st.integers(-4, 2**20), max_size=3), st.sampled_from(["float16", "int8", "bool"]))
    if kind == "meta":
        key = data.draw(st.sampled_from(["format", "version", "sparse24", "aliases"]), label="key")
        value = data.draw(st.one_of(st.none(), st.text(max_size=12), junk.map(json.dumps)), label="value")

        def edit(header):
            if value is None:
                header["__metadata__"].pop(key)
            else:
                header["__metadata__"][key] = value
        return _rewrite(raw, edit)
    if kind == "module":
        field = data.draw(st.sampled_from(["shape", "dtype", "bias", "name", "drop", "extra"]), label="field")
        factor = data.draw(st.sampled_from([0, -1, 2, 3, 2**20]), label="factor")
        value = data.draw(junk, label="value")

        def change(sparse):
            names = sorted(sparse)
            fqn = names[data.draw(st.integers(0, len(names) - 1), label="module")]
            info = dict(sparse[fqn])
            if field == "shape":
                info["shape"] = [info["shape"][0] * factor, info["shape"][1]] if factor != 3 else value
            elif field in ("dtype", "bias"):
                info[field] = value
            elif field == "extra":
                info["extra"] = value
            elif field == "drop":
                return {k: v for k, v in sparse.items() if k != fqn}
            else:  # a name the model does not have, or a module that is not a Linear
                return {**{k: v for k, v in sparse.items() if k != fqn},
                        data.draw(st.sampled_from(["model.layers.0", "model.nowhere", "lm_head", ""])): info}
            return {**sparse, fqn: info}
        return _rewrite(raw, _edit_meta("sparse24", change))
    field = data.draw(st.sampled_from(["shape", "dtype", "rename", "offsets"]), label="tensor field")

    def edit(header):
        names = sorted(k for k in header if k != "__metadata__")
        name = names[data.draw(st.integers(0, len(names) - 1), label="tensor")]
        entry = header[name]
        if field == "shape":
            entry["shape"] = data.draw(st.lists(st.integers(0, 2**20), max_size=3))
        elif field == "dtype":  # same byte count, another dtype: safetensors accepts it, the metadata does not
            entry["dtype"] = data.draw(st.sampled_from(["U8", "I8", "F16", "BF16", "F32", "I64", "F64"]))
            nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
            size = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "I64": 8, "F64": 8}[entry["dtype"]]
            entry["shape"] = [nbytes // size] if nbytes % size == 0 else entry["shape"]
        elif field == "rename":
            header[name + "x"] = header.pop(name)
        else:
            entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] + 2**30]
    return _rewrite(raw, edit)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_load_compressed(tmp_path, checkpoint, base_model, data):
    """Any corruption raises CheckpointError (or loads, where only tensor values changed), allocates no
    more than the file holds, and leaves the model as it was on failure."""
    bad = _mutate(data, checkpoint[1])
    d = tmp_path / "fuzz"
    d.mkdir(exist_ok=True)
    (d / FILENAME).write_bytes(bad)
    (d / "config.json").write_bytes((checkpoint[0] / "config.json").read_bytes())
    model = copy.deepcopy(base_model)
    snap = snapshot(model)
    try:
        with AllocGuard(len(bad)):
            load_compressed(model, d)
    except CheckpointError as exc:
        event(str(exc).split(": ", 1)[-1][:40])
        assert str(d / FILENAME) in str(exc)
        assert_unchanged(model, snap)
    else:  # only tensor values were changed: the declared modules are in place
        with safe_open(str(d / FILENAME), framework="pt") as f:
            declared = json.loads(f.metadata()["sparse24"])
        assert all(isinstance(model.get_submodule(n), SparseLinear) for n in declared)
