"""Atomic save_pretrained: reloadable with plain transformers, never half-written, no silent overwrite."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import random_ids, tiny_model, tiny_tokenizer

from llmprune_kernels.pipeline.save import save_model


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_save_and_reload_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, ::2] = 0  # a "pruned" weight must survive as is
    out = save_model(model, tok, tmp_path / "out", extra_json={"pruning_report.json": {"method": "test"}})
    assert any(out.glob("*.safetensors")) and not any(out.glob("*.bin"))
    assert json.loads((out / "pruning_report.json").read_text()) == {"method": "test"}
    assert _leftovers(tmp_path) == []
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    for (k, v), (k2, v2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    ids = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"] == tok("hello world")["input_ids"]


def test_refuses_to_overwrite_unless_asked(tmp_path):
    model = tiny_model("llama")
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"already exists; pass overwrite=True"):
        save_model(model, None, target)
    assert (target / "keep.txt").read_text() == "mine"
    save_model(model, None, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "config.json").exists()
    assert _leftovers(tmp_path) == []
    file_target = tmp_path / "file"
    file_target.write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        save_model(model, None, file_target, overwrite=True)


class _FailingTokenizer:
    def save_pretrained(self, path):
        (path / "tokenizer.json").write_text("{partial")
        raise OSError("disk full (simulated)")


def test_failure_leaves_no_partial_directory(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(OSError, match="simulated"):
        save_model(model, _FailingTokenizer(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_failure_keeps_previous_result(tmp_path):
    model = tiny_model("llama")
    target = save_model(model, None, tmp_path / "out")
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(OSError, match="simulated"):
        save_model(model, _FailingTokenizer(), target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == before
    assert _leftovers(tmp_path) == []


def test_gguf_quantization_config_is_dropped(tmp_path):
    from transformers import AutoConfig

    model = tiny_model("llama")
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    out = save_model(model, None, tmp_path / "out")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert AutoConfig.from_pretrained(out).model_type == "llama"


def test_a_directory_created_while_saving_is_never_replaced(tmp_path):
    """Another run that created the target meanwhile keeps it; this save fails and reports it."""
    model = tiny_model("llama")
    target = tmp_path / "out"
    real = model.save_pretrained

    def save_and_race(path, **kw):
        real(path, **kw)
        target.mkdir()
        (target / "theirs.txt").write_text("the other run's result")

    model.save_pretrained = save_and_race
    with pytest.raises(FileExistsError, match="created by another writer while this one was being written"):
        save_model(model, None, target)
    assert sorted(p.name for p in target.iterdir()) == ["theirs.txt"]
    assert _leftovers(tmp_path) == []


def test_a_concurrent_overwrite_fails_at_its_start(tmp_path):
    """Two runs replacing one target: the second fails before it writes anything (no ENOTEMPTY later)."""
    import threading

    from llmprune_kernels.atomic import TargetBusyError, reserve

    model = tiny_model("llama")
    target = save_model(model, None, tmp_path / "out")
    held, release = threading.Event(), threading.Event()

    def first_run():
        with reserve(target, overwrite=True, kind="dir"):
            held.set()
            release.wait(30)
            save_model(model, None, target, overwrite=True)

    calls = []
    model.save_pretrained = lambda *a, **k: calls.append(a)
    t = threading.Thread(target=first_run)
    t.start()
    held.wait(30)
    try:
        with pytest.raises(TargetBusyError, match="is being written by process"):
            save_model(model, None, target, overwrite=True)
        assert calls == []  # refused before writing
    finally:
        del model.save_pretrained
        release.set()
        t.join()
    assert (target / "config.json").exists() and _leftovers(tmp_path) == []
