"""SparseLLM: first iteration = local pruner, objective history, NaN fallback, options, pipeline glue."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from llmprune_kernels import SparsityConfig
from llmprune_kernels.reference.sparsegpt import sparsegpt_prune
from llmprune_kernels.methods.sparsellm_ffn import FFNBlock, SparseLLMOptions, sparsellm_ffn_
from llmprune_kernels.reference.wanda import wanda_prune_


def make_block(kind: str, hidden=32, inter=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    bias = kind == "relu"
    up = nn.Linear(hidden, inter, bias=bias)
    down = nn.Linear(inter, hidden, bias=bias)
    gate = nn.Linear(hidden, inter, bias=False) if kind == "swiglu" else None
    for lin in (up, down, gate):
        if lin is not None:
            with torch.no_grad():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.in_features**0.5)
    return FFNBlock(kind, up, down, gate)


def block_inputs(hidden=32, n=8, seq=64, seed=1):
    return torch.randn(n, seq, hidden, generator=torch.Generator().manual_seed(seed))


def dense_p(block: FFNBlock, X: torch.Tensor) -> torch.Tensor:
    X = X.reshape(-1, X.shape[-1])
    z = block.up(X)
    return torch.relu(z) if block.kind == "relu" else nn.functional.silu(block.gate(X)) * z


@pytest.mark.parametrize("kind", ["swiglu", "relu"])
@pytest.mark.parametrize("local", ["sparsegpt", "wanda"])
def test_one_iteration_equals_local_pruner(kind, local):
    block = make_block(kind)
    X = block_inputs()
    cfg = SparsityConfig(0.6)
    with torch.no_grad():
        p = dense_p(block, X)
    Xf = X.reshape(-1, 32)
    expected = {}
    for role, lin, inp in [("up", block.up, Xf), ("gate", block.gate, Xf), ("down", block.down, p)]:
        if lin is None:
            continue
        w = lin.weight.detach().clone()
        if local == "sparsegpt":
            expected[role] = sparsegpt_prune(w, 2.0 / 8 * inp.t() @ inp, cfg).weight
        else:
            wanda_prune_(w, inp.pow(2).sum(0) / 8, cfg)
            expected[role] = w
    sparsellm_ffn_(block, X, cfg, SparseLLMOptions(iterations=1, local=local, backend="reference"))
    for role, w in expected.items():
        torch.testing.assert_close(getattr(block, role).weight.detach(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["swiglu", "relu"])
@pytest.mark.parametrize("config", [SparsityConfig(0.7), SparsityConfig(n=2, m=4)])
def test_objective_non_increasing_and_sparsity_kept(kind, config):
    block = make_block(kind)
    X = block_inputs()
    rep = sparsellm_ffn_(block, X, config, SparseLLMOptions(iterations=5, backend="reference"))
    obj = [h["objective"] for h in rep["sparsellm_history"]]
    assert len(obj) == 5 and rep["sparsellm_nan_fallback"] is None
    assert all(b <= a * (1 + 1e-6) for a, b in zip(obj, obj[1:])), obj
    for lin in block.linears().values():
        w = lin.weight.detach()
        if config.is_nm:
            assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
        else:
            # SparseGPT prunes floor(rows * width * s) weights in every block of 128 columns.
            rows, cols = w.shape
            k = sum(int(rows * min(128, cols - c) * 0.7) for c in range(0, cols, 128))
            assert int((w == 0).sum()) >= k


def test_nan_falls_back_to_local_pruner(monkeypatch):
    block = make_block("swiglu")
    X = block_inputs()
    cfg = SparsityConfig(0.5)
    ref_block = copy.deepcopy(block)
    sparsellm_ffn_(ref_block, X, cfg, SparseLLMOptions(iterations=1, backend="reference"))
    real_pinv = torch.linalg.pinv
    calls = []

    def bad_pinv(a, *args, **kw):  # first call: X^+ (fine); second: p^+ in iteration 1 -> NaN
        calls.append(1)
        out = real_pinv(a, *args, **kw)
        return out if len(calls) == 1 else out * float("nan")

    monkeypatch.setattr(torch.linalg, "pinv", bad_pinv)
    rep = sparsellm_ffn_(block, X, cfg, SparseLLMOptions(iterations=3, backend="reference"), name="layers.7.mlp")
    assert rep["sparsellm_nan_fallback"]["iteration"] == 1
    assert "layers.7.mlp" in rep["sparsellm_warning"] and "sparsegpt" in rep["sparsellm_warning"]
    for role in ("up", "gate", "down"):
        assert torch.equal(getattr(block, role).weight, getattr(ref_block, role).weight)
        assert torch.isfinite(getattr(block, role).weight).all()


def test_too_few_tokens_keeps_local_result():
    block = make_block("relu")
    ref = copy.deepcopy(block)
    X = block_inputs(n=2, seq=16)  # 32 tokens < intermediate width 64
    sparsellm_ffn_(ref, X, SparsityConfig(0.5), SparseLLMOptions(iterations=1, backend="reference"))
    rep = sparsellm_ffn_(block, X, SparsityConfig(0.5), SparseLLMOptions(iterations=4, backend="reference"),
                         name="layers.1")
    assert len(rep["sparsellm_history"]) == 1 and "under-determined" in rep["sparsellm_warning"]
    for role in ("up", "down"):
        assert torch.equal(getattr(block, role).weight, getattr(ref, role).weight)


@pytest.mark.parametrize("kw,match", [
    ({"alpha": -1.0}, "alpha"),
    ({"iterations": 0}, "iterations"),
    ({"local": "magnitude"}, "local pruner"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        sparsellm_ffn_(make_block("relu"), block_inputs(), SparsityConfig(0.5), SparseLLMOptions(**kw))


def test_family_defaults_reported():
    rep = sparsellm_ffn_(make_block("relu"), block_inputs(), SparsityConfig(0.5),
                         SparseLLMOptions(iterations=1, backend="reference"))
    assert rep["sparsellm_options"]["alpha"] == 0.1 and rep["sparsellm_options"]["gamma"] == 0.1
    rep = sparsellm_ffn_(make_block("swiglu"), block_inputs(), SparsityConfig(0.5),
                         SparseLLMOptions(iterations=1, beta=2.0, backend="reference"))
    assert rep["sparsellm_options"]["alpha"] == 5.0 and rep["sparsellm_options"]["beta"] == 2.0


def test_nan_inputs_rejected():
    X = block_inputs()
    X[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sparsellm_ffn_(make_block("relu"), X, SparsityConfig(0.5), name="layers.2.mlp")


@pytest.mark.slow
def test_objective_non_increasing_on_real_smollm2_block():
    """SparseLLM on layer 5's MLP of the real SmolLM2-135M (inputs from the dense model), 70%.

    Wanda as the local pruner keeps this CPU test short; the SparseGPT default behaves the same (measured:
    8 iterations, objective 7.8e5 -> 8.2e4, block output error 0.235 -> 0.206; see the README).
    """
    from llmprune_kernels.pipeline import data as D
    from llmprune_kernels.pipeline.models import load_model

    model, tok = load_model(None)
    text = D.load_text(None, None)
    calib = D.calibration_windows(D.tokenize(tok, text.calibration), 16, 128, seed=0)
    mlp = model.model.layers[5].mlp
    xs = []
    h = mlp.register_forward_hook(lambda _m, inp, _o: xs.append(inp[0].detach()))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    h.remove()
    X = torch.cat(xs)
    block = FFNBlock("swiglu", mlp.up_proj, mlp.down_proj, mlp.gate_proj)
    rep = sparsellm_ffn_(block, X, SparsityConfig(0.7), SparseLLMOptions(iterations=3, local="wanda"), nsamples=16)
    hist = rep["sparsellm_history"]
    assert rep["sparsellm_nan_fallback"] is None and len(hist) == 3
    obj = [x["objective"] for x in hist]
    assert all(b <= a for a, b in zip(obj, obj[1:])), obj
    for lin in block.linears().values():
        assert torch.isfinite(lin.weight).all() and (lin.weight == 0).float().mean() >= 0.69


def test_keep_best_never_worse_than_local_pruner():
    block = make_block("swiglu")
    X = block_inputs()
    rep = sparsellm_ffn_(block, X, SparsityConfig(0.7), SparseLLMOptions(iterations=4, backend="reference"))
    errs = [h["relative_output_error"] for h in rep["sparsellm_history"]]
    chosen = rep["sparsellm_chosen_iteration"]
    assert errs[chosen] == min(errs) and errs[chosen] <= errs[0]
    with torch.no_grad():
        Xf = X.reshape(-1, 32)
        got = block.down(nn.functional.silu(block.gate(Xf)) * block.up(Xf))
    assert got.shape == (512, 32) and torch.isfinite(got).all()
