"""OWL layer-wise sparsity: the reference mapping, exact mean, monotonicity, bounds, outlier ratios."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from llmprune_kernels.pipeline.owl import (
    collect_outlier_ratios, layer_param_counts, outlier_ratio, owl_layer_sparsity, owl_sparsities,
)
from llmprune_kernels.reference.wanda import ActNormStats, wanda_score


def owl_reference_numpy(ratios, target, lam):
    """The lines of OWL's prune_wanda_outlier, verbatim in numpy: densities, then 1 - density."""
    r = np.array(ratios)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    r = r - np.mean(r) + (1 - target)
    return 1 - r


def test_equals_reference_mapping():
    ratios = [3.1, 5.7, 2.2, 9.0, 4.4, 4.4]
    got = owl_sparsities(ratios, 0.7, 0.08)
    np.testing.assert_allclose(got, owl_reference_numpy(ratios, 0.7, 0.08), rtol=0, atol=1e-12)
    assert max(got) - min(got) == pytest.approx(2 * 0.08)  # spread over a window of width 2*lambda


@settings(max_examples=200, deadline=None)
@given(
    ratios=st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=40),
    target=st.floats(0.0, 0.95),
    lam=st.floats(0.0, 0.5),
)
def test_mean_exact_monotone_bounded(ratios, target, lam):
    s = owl_sparsities(ratios, target, lam)
    assert abs(float(np.mean(s)) - target) < 1e-9
    assert all(0.0 <= x <= 0.99 for x in s)
    # More outliers never get a higher sparsity.
    order = np.argsort(ratios, kind="stable")
    ss = np.array(s)[order]
    assert np.all(np.diff(ss) <= 1e-12)


@settings(max_examples=100, deadline=None)
@given(
    ratios=st.lists(st.floats(0, 100, allow_nan=False), min_size=2, max_size=20),
    data=st.data(),
)
def test_weighted_mean_exact(ratios, data):
    weights = data.draw(st.lists(st.integers(1, 10**6), min_size=len(ratios), max_size=len(ratios)))
    s = owl_sparsities(ratios, 0.7, 0.08, weights=weights)
    assert abs(float(np.dot(s, weights) / np.sum(weights)) - 0.7) < 1e-9


def test_equal_weights_equal_plain_mean():
    ratios = [1.0, 2.0, 7.0]
    assert owl_sparsities(ratios, 0.5, weights=[10, 10, 10]) == pytest.approx(owl_sparsities(ratios, 0.5), abs=1e-15)


def test_uniform_when_all_ratios_equal():
    assert owl_sparsities([2.0, 2.0, 2.0], 0.6) == [0.6, 0.6, 0.6]


def test_clipping_keeps_mean_and_order():
    # Target near the upper bound: the un-clipped mapping would exceed 0.99 for the lowest-outlier layer.
    s = owl_sparsities([0.0, 10.0, 10.0, 10.0], 0.95, lam=0.2)
    assert max(s) <= 0.99 and abs(np.mean(s) - 0.95) < 1e-9 and s[0] >= s[1]


@pytest.mark.parametrize("kw,match", [
    ({"target": 1.0}, "sparsity"),
    ({"lam": -0.1}, "lambda"),
    ({"target": 0.995}, "bounds"),
])
def test_bad_parameters(kw, match):
    args = {"ratios": [1.0, 2.0], "target": 0.5, "lam": 0.08} | kw
    with pytest.raises(ValueError, match=match):
        owl_sparsities(**args)


def test_outlier_ratio_by_hand():
    # mean = (1+1+1+1+16)/5 = 4 -> threshold 5*4 = 20 -> no outlier; M=3 -> threshold 12 -> one of five.
    s = [torch.tensor([[1.0, 1.0], [1.0, 1.0]]), torch.tensor([16.0])]
    assert outlier_ratio(s, 5.0) == 0.0
    assert outlier_ratio(s, 3.0) == pytest.approx(20.0)


def test_collect_outlier_ratios_tiny_llama():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # plant 150 large weights in layer 1 so it has the most outliers
        w = model.model.layers[1].mlp.up_proj.weight.view(-1)
        w[torch.randperm(w.numel())[:150]] *= 20
    calib = torch.randint(0, 64, (3, 16))
    ratios = collect_outlier_ratios(model, calib, m=5.0, batch_size=2)
    assert len(ratios) == 3 and ratios[1] == max(ratios) and ratios[1] > 0
    # Layer-by-layer propagation equals one dense full-model forward with input hooks (nothing is pruned).
    stats = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            stats[name] = (mod, ActNormStats(mod.in_features))
            hooks.append(mod.register_forward_hook(lambda _m, i, _o, st=stats[name][1]: st.add_batch(i[0])))
    with torch.no_grad():
        model(input_ids=calib)
    for h in hooks:
        h.remove()
    full = [outlier_ratio([wanda_score(mod.weight, st.scaler_row) for n, (mod, st) in stats.items()
                           if n.startswith(f"model.layers.{i}.")]) for i in range(3)]
    assert ratios == pytest.approx(full, rel=1e-6)
    sp, report = owl_layer_sparsity(model, calib, 0.7)
    assert sp == owl_sparsities(ratios, 0.7, weights=layer_param_counts(model))
    assert sp[1] == min(sp) and abs(np.mean(sp) - 0.7) < 1e-12
    assert report["owl"]["outlier_ratios_percent"] == pytest.approx(ratios)
    assert abs(report["owl"]["weighted_mean_sparsity"] - 0.7) < 1e-12
