"""LLaMA-shaped checkpoints with random weights, written as Hugging Face safetensors directories.

Speed of the whole job needs the shapes of a real model, not its values: ``write_random_llama`` writes a
``config.json`` and one safetensors shard per decoder layer (plus one for embeddings, final norm and
head) with a ``model.safetensors.index.json``, generating each tensor on ``device`` and holding at most
one layer in memory, so a 13B directory can be written on a machine with less memory than the model.
The directory loads with plain ``transformers.AutoModelForCausalLM.from_pretrained``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

SHAPES: dict[str, dict[str, int]] = {
    # hidden, intermediate, layers, heads, key/value heads: the published LLaMA / LLaMA-2 shapes.
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8),
}


def llama_config(shape: str, layers: int | None = None, vocab_size: int = 32000, **overrides: int):
    """The ``LlamaConfig`` of a named shape (``SHAPES``), optionally with fewer decoder layers or other
    ``LlamaConfig`` fields (``overrides``, e.g. a small ``hidden_size`` for tests)."""
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; allowed: {', '.join(SHAPES)}")
    kw = dict(SHAPES[shape])
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers={layers!r} is invalid; allowed: an integer >= 1")
        kw["num_hidden_layers"] = layers
    kw.update(overrides)
    return LlamaConfig(**kw, vocab_size=vocab_size, max_position_embeddings=4096, tie_word_embeddings=False)


def _shard_tensors(names_shapes, dtype: torch.dtype, device, generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in names_shapes:
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype, device=device)
        else:
            fan_in = shape[-1]
            t = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
            t = t.mul_(fan_in ** -0.5).to(dtype)
        out[name] = t.cpu().contiguous()
    return out


def write_random_llama(directory: str | os.PathLike, shape: str = "llama-7b", *, layers: int | None = None,
                       dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu",
                       seed: int = 0, **overrides: int) -> Path:
    """Write a random LLaMA-shaped checkpoint into the new directory ``directory``; returns its path.

    Weights are N(0, 1/fan_in) (norms one), so activations keep their scale through the layers.
    ``directory`` must not exist (nothing is overwritten); ``overrides`` go to ``llama_config``.
    """
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    out = Path(directory).expanduser()
    if out.exists():
        raise FileExistsError(f"{str(out)!r} already exists; allowed: a path that does not exist yet")
    cfg = llama_config(shape, layers, **overrides)
    cfg.dtype = dtype
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg)
    groups: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, p in meta.state_dict().items():
        parts = name.split(".")
        key = f"layer{int(parts[2]):03d}" if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append((name, tuple(p.shape)))
    del meta
    out.mkdir(parents=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    keys = sorted(k for k in groups if k != "rest") + ["rest"]
    for i, key in enumerate(keys):
        fname = f"model-{i + 1:05d}-of-{len(keys):05d}.safetensors"
        tensors = _shard_tensors(groups[key], dtype, device, gen)
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({name: fname for name in tensors})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    cfg.save_pretrained(out)
    return out
