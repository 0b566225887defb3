"""GBLM-Pruner: gradient collection against a plain autograd loop, score and masks, pipeline method."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from llmprune_kernels import SparsityConfig, get_method
from llmprune_kernels.reference.wanda import ActNormStats, wanda_mask
from llmprune_kernels.pipeline.gradients import collect_gradient_norms, decoder_linears
from llmprune_kernels.reference.gblm import gblm_mask, gblm_prune_, gblm_score


def tiny_llama():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_opt():
    cfg = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                    word_embed_proj_dim=32, max_position_embeddings=64, dropout=0.0)
    return OPTForCausalLM(cfg).eval()


def autograd_reference(model, samples, scale):
    """The reference's loop, literally: full backward, then (grad.float() * scale) ** 2 summed, sqrt."""
    lins = decoder_linears(model)
    acc = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in lins.items()}
    for ids in samples:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids.unsqueeze(0), labels=ids.unsqueeze(0)).loss.backward()
        for n, m in lins.items():
            acc[n] += (m.weight.grad.float() * scale) ** 2
    model.zero_grad(set_to_none=True)
    return {n: a.sqrt() for n, a in acc.items()}


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_gradient_norms_equal_plain_autograd_loop(make):
    model = make()
    samples = [torch.randint(0, 64, (12,)) for _ in range(3)]
    expected = autograd_reference(model, samples, 100.0)
    before = [p.requires_grad for p in model.parameters()]
    got = collect_gradient_norms(model, samples, store_dtype=torch.float32)
    assert set(got.norms) == set(expected) and len(got.norms) == 2 * (7 if make is tiny_llama else 6)
    for n in expected:
        torch.testing.assert_close(got.norms[n], expected[n], rtol=1e-5, atol=1e-6)
    assert got.nsamples == 3 and len(got.losses) == 3
    # The model is left as it was: no gradients held, requires_grad restored.
    assert [p.requires_grad for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())
    mem = got.memory
    assert mem["accumulator_bytes"] == sum(4 * m.weight.numel() for m in decoder_linears(model).values())
    assert 0 < mem["largest_grad_bytes"] <= max(4 * m.weight.numel() for m in decoder_linears(model).values())


def test_gradient_norms_fp16_storage_and_scale():
    model = tiny_llama()
    samples = [torch.randint(0, 64, (10,)) for _ in range(2)]
    g16 = collect_gradient_norms(model, samples)  # reference default: fp16 result
    g1 = collect_gradient_norms(model, samples, scale=1.0, store_dtype=torch.float32)
    name = next(iter(g16.norms))
    assert g16.norms[name].dtype == torch.float16
    torch.testing.assert_close(g16.norms[name].float(), (g1.norms[name] * 100).half().float())


def test_gradient_bad_input():
    model = tiny_llama()
    with pytest.raises(ValueError, match="scale"):
        collect_gradient_norms(model, [torch.randint(0, 64, (8,))], scale=0)
    with pytest.raises(ValueError, match="shape"):
        collect_gradient_norms(model, [torch.randint(0, 64, (2, 8))])
    with pytest.raises(ValueError, match="no calibration samples"):
        collect_gradient_norms(model, [])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("config", [SparsityConfig(0.5), SparsityConfig(0.7), SparsityConfig(n=2, m=4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gblm_with_zero_gradient_equals_wanda(config, dtype, device):
    w = torch.randn(16, 64, device=device).to(dtype)
    stats = ActNormStats(64, device=device)
    stats.add_batch(torch.randn(3, 7, 64, device=device))
    zero = torch.zeros(16, 64, dtype=torch.float16, device=device)
    assert torch.equal(gblm_mask(w, stats.scaler_row, zero, config), wanda_mask(w, stats.scaler_row, config))


def test_gblm_by_hand():
    # |W| = [1, 2, 3, 0.5], sqrt(norm) = [1, 0.5, 2, 4] -> Wanda [1, 1, 6, 2]; G adds |W|*G = [2, 0, 0, 1].
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    norm_sq = torch.tensor([1.0, 0.25, 4.0, 16.0])
    g = torch.tensor([[2.0, 0.0, 0.0, 2.0]])
    torch.testing.assert_close(gblm_score(w, norm_sq, g), torch.tensor([[3.0, 1.0, 6.0, 3.0]]))
    # 50%: prune the two lowest: col 1 (1.0), then the tie 3.0 between col 0 and col 3 -> col 0 (lower index).
    assert gblm_mask(w, norm_sq, g, SparsityConfig(0.5)).tolist() == [[True, True, False, False]]


def test_gblm_fp16_gradient_term_in_promoted_dtype():
    # The reference multiplies |W| (fp16) by G (fp16) in fp16, then casts to fp32.
    w = torch.randn(4, 8).half()
    g = torch.rand(4, 8).half() * 3
    n = torch.rand(8)
    expected = w.abs().float() * n.sqrt() + (w.abs() * g).float()
    assert torch.equal(gblm_score(w, n, g), expected)


def test_gblm_exact_counts_and_kept_unchanged():
    w = torch.randn(9, 40)
    orig = w.clone()
    mask = gblm_prune_(w, torch.rand(40), torch.rand(9, 40), SparsityConfig(0.6))
    assert (mask.sum(1) == math.floor(40 * 0.6)).all()
    assert torch.equal(w[~mask], orig[~mask]) and (w[mask] == 0).all()


def test_gblm_bad_gradient_shape_and_nan():
    w = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"gradient norms have shape \(8,\)"):
        gblm_mask(w, torch.ones(8), torch.ones(8), SparsityConfig(0.5))
    g = torch.ones(3, 8)
    g[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gblm_mask(w, torch.ones(8), g, SparsityConfig(0.5))


def test_gblm_method_uses_gradients_by_layer_name():
    model = tiny_llama()
    samples = [torch.randint(0, 64, (10,)) for _ in range(2)]
    grads = collect_gradient_norms(model, samples)
    name, lin = next(iter(decoder_linears(model).items()))
    x = torch.randn(2, 10, lin.in_features)
    expected = gblm_mask(lin.weight.data.clone(), (x.pow(2).sum((0, 1)) / 2), grads.norms[name], SparsityConfig(0.5))
    pruner = get_method("gblm")(lin, SparsityConfig(0.5), layer_name=name, gradients=grads)
    pruner.add_batch(x)
    pruner.prune()
    assert torch.equal(lin.weight.data == 0, expected | (lin.weight.data == 0))
    assert ((lin.weight.data == 0).sum(1) >= lin.in_features // 2).all()
    with pytest.raises(ValueError, match="needs gradient norms"):
        p = get_method("gblm")(lin, SparsityConfig(0.5), layer_name=name)
        p.add_batch(x)
        p.prune()
