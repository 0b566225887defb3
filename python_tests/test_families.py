"""Model families end to end on tiny random configs (offline): prune, save, reload with plain transformers,
perplexity, the 2:4 swap; and the mixture-of-experts path (per-expert slices fed only their routed tokens,
the expert rule for starved experts, routers never pruned, SparseExperts)."""
from __future__ import annotations

import math

import pytest
import torch
from tiny_models import FAMILIES, MOE_FAMILIES, NUM_EXPERTS, random_ids, starve_expert, tiny_model, tiny_tokenizer
from torch import nn

from llmprune_kernels import SparseLinear, SparsityConfig, perplexity, prune_model, save_model, sparsify_
from llmprune_kernels.pipeline.experts import ExpertSlice, expert_slices, routed_tokens
from llmprune_kernels.pipeline.models import find_decoder_layers, prunable_modules
from llmprune_kernels.reference.wanda import ActNormStats, mask_from_score, wanda_mask
from llmprune_kernels.sparse24.experts import SparseExperts

NM = SparsityConfig(n=2, m=4)
STARVED = NUM_EXPERTS - 1  # the expert starve_expert() routes no token to


def _model(kind: str):
    model = tiny_model(kind)
    if kind in MOE_FAMILIES:
        starve_expert(model, STARVED)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _routers(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("mlp.gate.weight",
                                                                                     "shared_expert_gate.weight"))}


@pytest.mark.parametrize("kind", [k for k in FAMILIES if k != "llama"])
def test_family_prune_save_reload_perplexity_swap(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    model, calib, evals = _model(kind), random_ids(4, 32, seed=1), random_ids(2, 32, seed=2)
    routers = _routers(model)
    dense_ppl = perplexity(model, evals)
    result = prune_model(model, calib, "wanda", NM, progress=False)
    _, layers = find_decoder_layers(model)
    names = [f"{find_decoder_layers(model)[0]}.{i}.{rel}" for i, layer in enumerate(layers)
             for rel in prunable_modules(layer)]
    assert [s.name for s in result.linears] == names
    assert all(s.nm_ok and s.sparsity == 0.5 for s in result.linears), [s.name for s in result.linears if not s.nm_ok]
    for name, w in routers.items():  # routers (and Qwen2-MoE's shared-expert gate) are never pruned
        assert torch.equal(dict(model.named_parameters())[name], w), name
        assert not any(s.name == name.removesuffix(".weight") for s in result.linears)
    if kind in MOE_FAMILIES:
        experts = [s for s in result.linears if "expert" in s.extra]
        assert len(experts) == len(layers) * NUM_EXPERTS * 2
        starved = [s for s in experts if s.extra["expert"] == STARVED]
        assert starved and all(s.extra["expert_tokens"] == 0 and s.extra["expert_rule"] == "magnitude"
                               for s in starved)
        assert any(s.extra["expert_rule"] == "calibrated" for s in experts)
    ids = random_ids(2, 24, seed=3)
    pruned_logits = _logits(model, ids)

    out = save_model(model, tiny_tokenizer(), tmp_path / kind)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(reloaded, ids), pruned_logits, rtol=0, atol=0)
    ppl = perplexity(reloaded, evals)
    assert math.isfinite(ppl) and ppl > 1 and ppl != dense_ppl

    sparsify_(reloaded)
    swapped = [m for m in reloaded.modules() if isinstance(m, SparseLinear)]
    n_experts = sum(isinstance(m, SparseExperts) for m in reloaded.modules())
    assert n_experts == (len(layers) if kind in MOE_FAMILIES else 0)
    assert len(swapped) == len(names)  # one SparseLinear per pruned Linear / expert matrix
    assert not any(isinstance(m, nn.Linear) and not isinstance(m, SparseLinear) and "layers" in n
                   and not n.endswith("shared_expert_gate") for n, m in reloaded.named_modules())
    torch.testing.assert_close(_logits(reloaded, ids), pruned_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", MOE_FAMILIES)
def test_expert_slices_see_exactly_their_routed_tokens(kind):
    """Hooks on ExpertSlice views get hidden[token_idx] (gate_up) and act(gate) * up (down) of the tokens the
    router picked for that expert; the block's output is bit for bit the same with and without the hooks."""
    block = _model(kind).model.layers[0].mlp
    experts = block.experts
    h = torch.randn(3, 10, 64)
    h[..., 0] = 8.0  # the positive channel of starve_expert (the block is called without its input norm here)
    flat = h.view(-1, 64)
    _, _, top_k_index = block.gate(flat)
    slices = expert_slices(experts, "experts")
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in slices}
    handles = [sl.register_forward_hook(lambda m, i, o, n=name: seen[n].append(i[0].clone()))
               for name, sl in slices.items()]
    assert "forward" in experts.__dict__
    with torch.no_grad():
        hooked = block(h)
    for hd in handles:
        hd.remove()
    assert "forward" not in experts.__dict__  # the module's own forward is back
    with torch.no_grad():
        plain = block(h)
    assert torch.equal(hooked, plain)
    for e in range(NUM_EXPERTS):
        tokens = torch.nonzero((top_k_index == e).any(dim=-1)).flatten()
        got = seen[f"experts.{e}.gate_up_proj"]
        if len(tokens) == 0:
            assert got == [] and seen[f"experts.{e}.down_proj"] == []
            continue
        (x,) = got
        assert torch.equal(x[torch.argsort(_row_tokens(x, flat))], flat[tokens])
        gate, up = nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        (d,) = seen[f"experts.{e}.down_proj"]
        torch.testing.assert_close(d, experts.act_fn(gate) * up, rtol=0, atol=0)
    assert seen[f"experts.{STARVED}.gate_up_proj"] == []


def _row_tokens(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """For each row of x, the index of the equal row of flat."""
    eq = (x[:, None, :] == flat[None, :, :]).all(-1)
    assert bool((eq.sum(-1) == 1).all())
    return eq.float().argmax(-1)


def test_expert_slice_is_a_view_of_the_3d_parameter():
    experts = _model("mixtral").model.layers[0].mlp.experts
    sl = ExpertSlice(experts, "down_proj", 2)
    assert (sl.out_features, sl.in_features) == (64, 32) and sl.bias is None
    assert sl.weight.data_ptr() == experts.down_proj[2].data_ptr()
    sl.weight.data[0, :4] = 0  # pruners write in place: the 3-D parameter changes
    assert bool((experts.down_proj[2, 0, :4] == 0).all())
    experts.down_proj = nn.Parameter(torch.ones_like(experts.down_proj))  # a streamed load replaces it
    assert bool((sl.weight == 1).all()) and list(sl.state_dict()) == []


@pytest.mark.parametrize("kind", ["mixtral", "qwen3-moe"])
def test_expert_masks_follow_the_routed_statistics_and_the_rule(kind):
    """Layer 0's expert masks: Wanda's reference on each expert's routed tokens; row magnitude below the
    threshold (the starved expert, and here every expert under min_expert_tokens)."""
    dense, calib = _model(kind), random_ids(4, 32, seed=1)
    block = dense.model.layers[0].mlp
    inputs = []
    hd = block.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().reshape(-1, 64)))
    _logits(dense, calib)  # one batch, as the pipeline's (batch size 4)
    hd.remove()
    (flat,) = inputs
    _, _, top_k_index = block.gate(flat)
    routed = {e: tok for e, _, tok in routed_tokens(top_k_index, NUM_EXPERTS)}
    counts = {e: len(routed.get(e, ())) for e in range(NUM_EXPERTS)}
    threshold = sorted(c for c in counts.values() if c)[1] + 1  # at least two routed experts fall below it
    gu = block.experts.gate_up_proj.detach().clone()
    dn = block.experts.down_proj.detach().clone()
    result = prune_model(dense, calib, "wanda", SparsityConfig(0.5), progress=False, min_expert_tokens=threshold)
    lines = {s.name: s for s in result.linears}
    pruned = dense.model.layers[0].mlp.experts
    for e in range(NUM_EXPERTS):
        line = lines[f"model.layers.0.mlp.experts.{e}.gate_up_proj"]
        rule = "calibrated" if counts[e] >= threshold else "magnitude"
        assert line.extra.items() >= {"expert": e, "expert_tokens": counts[e], "expert_rule": rule}.items()
        if counts[e] >= threshold:
            x = flat[routed[e]]
            stats = ActNormStats(64)
            stats.add_batch(x)
            want = wanda_mask(gu[e], stats.scaler_row, SparsityConfig(0.5))
        else:
            want = mask_from_score(gu[e].abs().float(), SparsityConfig(0.5))
        assert torch.equal(pruned.gate_up_proj[e] == 0, want), e
        if counts[e] < threshold:
            assert torch.equal(pruned.down_proj[e] == 0, mask_from_score(dn[e].abs().float(), SparsityConfig(0.5)))
    assert counts[STARVED] == 0


def test_min_expert_tokens_is_checked():
    model, calib = _model("mixtral"), random_ids(2, 16)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match=r"min_expert_tokens .* is invalid; allowed: an integer >= 1"):
            prune_model(model, calib, "wanda", progress=False, min_expert_tokens=bad)
    result = prune_model(model, calib, "sparsegpt", NM, progress=False, min_expert_tokens=10**9)
    assert {s.extra["expert_rule"] for s in result.linears if "expert" in s.extra} == {"magnitude"}
    assert all(s.nm_ok for s in result.linears)


def test_magnitude_prunes_experts_without_calibration():
    model = _model("qwen3-moe")
    result = prune_model(model, None, "magnitude", NM, progress=False)
    experts = [s for s in result.linears if "expert" in s.extra]
    assert len(experts) == 2 * NUM_EXPERTS * 2 and all(s.nm_ok and "expert_rule" not in s.extra for s in experts)


def test_sparse_experts_equal_the_dense_eager_experts():
    model = _model("mixtral")
    prune_model(model, None, "magnitude", NM, progress=False)
    experts = model.model.layers[1].mlp.experts
    sparse = SparseExperts.from_experts(experts)
    assert len(sparse.linears()) == 2 * NUM_EXPERTS
    assert all(isinstance(m, SparseLinear) for m in sparse.linears())
    x = torch.randn(40, 64)
    idx = torch.stack([torch.randperm(NUM_EXPERTS - 1)[:2] for _ in range(40)])  # expert 5 gets nothing
    w = torch.softmax(torch.randn(40, 2), -1)
    configured, experts.config._experts_implementation = experts.config._experts_implementation, "eager"
    try:
        with torch.no_grad():
            want = experts(x, idx, w)  # transformers' eager loop
    finally:
        experts.config._experts_implementation = configured
    with torch.no_grad():
        assert torch.equal(sparse(x, idx, w), want)
    for e in range(NUM_EXPERTS):
        assert torch.equal(sparse.gate_up[e].weight, experts.gate_up_proj[e])
        assert torch.equal(sparse.down[e].weight, experts.down_proj[e])


def test_sparsify_leaves_non_24_experts_dense_and_names_a_bad_picked_one():
    model = _model("qwen3-moe")
    prune_model(model, None, "magnitude", NM, progress=False)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[3, 0, :4] = 1.0  # expert 3 breaks 2:4 in one group
    sparsify_(model)
    kinds = [type(model.model.layers[i].mlp.experts).__name__ for i in range(2)]
    assert kinds == ["Qwen3MoeExperts", "SparseExperts"]
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.experts: expert 3 down_proj: .*row 0"):
        sparsify_(model, filter_fn=lambda m, fqn: fqn.endswith("experts"))
