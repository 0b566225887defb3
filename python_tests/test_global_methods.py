"""GBLM, SparseLLM and OWL through the layer-wise pipeline; OPT support (tiny random models)."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from llmprune_kernels import SparsityConfig
from llmprune_kernels.pipeline.evaluate import perplexity
from llmprune_kernels.pipeline.owl import owl_layer_sparsity
from llmprune_kernels.pipeline import prune_model


def tiny_llama(layers=2):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_opt():
    cfg = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    word_embed_proj_dim=32, max_position_embeddings=64, dropout=0.0)
    return OPTForCausalLM(cfg).eval()


def ids(n=4, seq=24):
    return torch.randint(0, 64, (n, seq))


def zero_counts_ok(stats, config):
    for s in stats:
        rows, cols = s.shape
        if config.is_nm:
            assert s.nm_ok, s.name
        else:
            # Wanda/magnitude: exact; SparseGPT: floor per block of 128 columns -> at least this many.
            assert s.sparsity * rows * cols >= rows * math.floor(cols * config.sparsity) - rows, s.name


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("config", [SparsityConfig(0.5), SparsityConfig(n=2, m=4)])
def test_opt_in_pipeline(method, config):
    model = tiny_opt()
    calib = ids()
    res = prune_model(model, calib, method, config, batch_size=2, progress=False)
    names = [s.name for s in res.linears]
    assert len(names) == 12 and "model.decoder.layers.0.fc1" in names and "model.decoder.layers.1.fc2" in names
    zero_counts_ok(res.linears, config)
    assert math.isfinite(perplexity(model, ids(2, 16)))


def test_gblm_zero_gradient_equals_wanda_in_pipeline():
    calib = ids()
    a, b = tiny_llama(), tiny_llama()
    b.load_state_dict(a.state_dict())
    zeros = {n: torch.zeros_like(m.weight, dtype=torch.float16) for n, m in a.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in n}
    prune_model(a, calib, "gblm", SparsityConfig(0.5), batch_size=2, options={"gradients": zeros}, progress=False)
    prune_model(b, calib, "wanda", SparsityConfig(0.5), batch_size=2, progress=False)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


def test_gblm_pipeline_computes_gradients():
    model = tiny_llama()
    res = prune_model(model, ids(), "gblm", SparsityConfig(0.5), batch_size=2, progress=False)
    zero_counts_ok(res.linears, SparsityConfig(0.5))
    assert all(s.sparsity == 0.5 for s in res.linears)
    assert "model_info" not in res.options  # the gradients stay out of the report
    mem = res.method_report["memory_bytes"]
    assert mem["accumulator_bytes"] == mem["weight_bytes"]  # fp32 model: one extra copy, no more
    assert res.method_report["nsamples"] == 4 and res.method_report["scale"] == 100.0


@pytest.mark.parametrize("make,last", [(tiny_llama, "mlp.down_proj"), (tiny_opt, "fc2")])
def test_sparsellm_in_pipeline(make, last):
    model = make()
    cfg = SparsityConfig(0.6)
    res = prune_model(model, ids(6, 32), "sparsellm", cfg, batch_size=3, options={"iterations": 2}, progress=False)
    zero_counts_ok(res.linears, cfg)
    by_name = {s.name.split("layers.", 1)[1]: s for s in res.linears}
    for i in range(2):
        hist = by_name[f"{i}.{last}"].extra["sparsellm_history"]
        assert len(hist) == 2 and by_name[f"{i}.{last}"].extra["sparsellm_nan_fallback"] is None
    blocks = res.method_report["sparsellm"]["blocks"]
    assert len(blocks) == 2 and all(len(b["sparsellm_history"]) == 2 for b in blocks)
    attn = next(s for s in res.linears if "q_proj" in s.name)
    assert "sparsegpt_damp" in attn.extra  # attention projections: the local pruner
    assert math.isfinite(perplexity(model, ids(2, 16)))


def test_gblm_and_owl_progress_bars_have_totals(capsys):
    """The GBLM gradient pass and the OWL walk show a bar with its total (both take minutes on CPU)."""
    prune_model(tiny_llama(), ids(3, 16), "gblm", SparsityConfig(0.5), progress=True)
    err = capsys.readouterr().err
    assert "GBLM gradients" in err and "3/3" in err
    owl_layer_sparsity(tiny_llama(layers=3), ids(2, 16), 0.5, progress=True)
    err = capsys.readouterr().err
    assert "OWL outlier ratios" in err and "3/3" in err


def test_sparsellm_needs_pipeline_and_supported_model():
    from llmprune_kernels import get_method

    lin = torch.nn.Linear(8, 8)
    with pytest.raises(ValueError, match="through the pipeline"):
        get_method("sparsellm")(lin, SparsityConfig(0.5), layer_name="x")
    from llmprune_kernels.methods.sparsellm import ffn_kind

    model = tiny_llama()
    model.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        ffn_kind(model)


def test_owl_in_pipeline_exact_mean():
    model = tiny_llama(layers=4)
    with torch.no_grad():  # give layer 2 many large weights: it must get the lowest sparsity
        w = model.model.layers[2].mlp.up_proj.weight.view(-1)
        w[torch.randperm(w.numel())[:300]] *= 20
    calib = ids()
    layer_sparsity, report = owl_layer_sparsity(model, calib, 0.6, batch_size=2)
    assert abs(sum(layer_sparsity) / 4 - 0.6) < 1e-12 and layer_sparsity[2] == min(layer_sparsity)
    res = prune_model(model, calib, "wanda", SparsityConfig(0.6), batch_size=2, layer_sparsity=layer_sparsity,
                      progress=False)
    for s in res.linears:
        layer = int(s.name.split("layers.")[1].split(".")[0])
        assert s.sparsity == math.floor(s.shape[1] * layer_sparsity[layer]) / s.shape[1]
    assert abs(res.overall_sparsity - 0.6) < 0.02  # per-row floor; the allocation itself is exact


@pytest.fixture(scope="module")
def tiny_cli_dir(tmp_path_factory):
    from llmprune_kernels.pipeline.save import save_model
    from tiny_models import SAMPLE_TEXT, tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("cli_global")
    save_model(tiny_model("llama"), tiny_tokenizer(), root / "model")
    (root / "text.txt").write_text(SAMPLE_TEXT * 30)
    return root


def _cli(root, *extra):
    return ["prune", str(root / "model"), "--text", str(root / "text.txt"), "--nsamples", "4", "--seqlen", "32",
            "--device", "cpu", "-q", "--no-eval", *extra]


def test_cli_owl_gblm_sparsellm_reports(tiny_cli_dir, tmp_path, capsys):
    import json

    from llmprune_kernels.cli import main

    rep = tmp_path / "owl.json"
    assert main(_cli(tiny_cli_dir, "--method", "wanda", "--sparsity", "0.6", "--owl", "--owl-m", "3",
                     "--owl-lambda", "0.1", "--report", str(rep))) == 0
    owl = json.loads(rep.read_text())["owl"]
    assert owl["M"] == 3.0 and owl["lambda"] == 0.1 and len(owl["layer_sparsity"]) == len(owl["outlier_ratios_percent"])
    assert abs(owl["weighted_mean_sparsity"] - 0.6) < 1e-12
    lo, hi = min(owl["layer_sparsity"]), max(owl["layer_sparsity"])
    assert (f"OWL:              layer sparsity {lo:.4f} to {hi:.4f} over 2 layers (M 3, lambda 0.1; weighted "
            f"mean 0.6000)") in capsys.readouterr().out
    rep = tmp_path / "gblm.json"
    assert main(_cli(tiny_cli_dir, "--method", "gblm", "--pattern", "2:4", "--report", str(rep))) == 0
    r = json.loads(rep.read_text())
    assert r["method_report"]["memory_bytes"]["accumulator_bytes"] > 0 and all(s["nm_ok"] for s in r["linears"])
    rep = tmp_path / "sparsellm.json"
    assert main(_cli(tiny_cli_dir, "--method", "sparsellm", "--sparsity", "0.5", "--option", "iterations=2",
                     "--option", "local='wanda'", "--report", str(rep))) == 0
    r = json.loads(rep.read_text())
    assert r["options"]["iterations"] == 2 and r["method_report"]["sparsellm"]["options"]["local"] == "wanda"
    assert r["method_report"]["sparsellm"]["options"]["alpha"] == 5.0


def test_cli_owl_rejects_pattern(tiny_cli_dir):
    from llmprune_kernels.cli import main

    assert main(_cli(tiny_cli_dir, "--method", "wanda", "--pattern", "2:4", "--owl")) == 2
