"""The random LLaMA-shaped checkpoint writer used by the whole-job benchmark."""
import json

import pytest
import torch

from llmprune_kernels.testing.checkpoints import SHAPES, llama_config, write_random_llama

SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=320)


def test_writes_a_sharded_directory_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    out = write_random_llama(tmp_path / "m", "llama-70b", layers=3, **SMALL)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4  # one shard per decoder layer + the rest
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16 and model.config.num_hidden_layers == 3
    assert set(index["weight_map"]) == set(model.state_dict())
    w = model.model.layers[1].mlp.down_proj.weight.float()
    assert abs(w.std().item() - 96 ** -0.5) < 0.2 * 96 ** -0.5  # N(0, 1/fan_in)
    assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.float16))


def test_same_seed_same_weights(tmp_path):
    from safetensors.torch import load_file

    a = write_random_llama(tmp_path / "a", layers=1, **SMALL)
    b = write_random_llama(tmp_path / "b", layers=1, **SMALL)
    fa, fb = load_file(a / "model-00001-of-00002.safetensors"), load_file(b / "model-00001-of-00002.safetensors")
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_refuses_an_existing_directory_and_bad_shapes(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        write_random_llama(tmp_path / "x", layers=1, **SMALL)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="allowed: llama-7b"):
        llama_config("llama-8b")
    with pytest.raises(ValueError, match="layers=0"):
        llama_config("llama-7b", layers=0)
    assert llama_config("llama-13b").hidden_size == SHAPES["llama-13b"]["hidden_size"]
