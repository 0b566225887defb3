"""DSnoT refinement: the vectorised masks equal the per-row reference, the expected error never grows, sparsity
and N:M groups are kept, and the "METHOD+dsnot" methods compose with the pipeline, its statistics and the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import random_ids, tiny_model

from llmprune_kernels import SparsityConfig, get_method, prune_model
from llmprune_kernels.cli import describe_methods, main
from llmprune_kernels.methods import check_options
from llmprune_kernels.methods.dsnot import dsnot_mask
from llmprune_kernels.methods.statistics import ActMomentSum, StatisticSpec, make_statistic, reference_statistic
from llmprune_kernels.pipeline.layerwise import capture_layer_inputs, walk_layers
from llmprune_kernels.pipeline.models import prunable_modules
from llmprune_kernels.pipeline.statistics import feed_statistics
from llmprune_kernels.reference.dsnot import dsnot_mask_reference, refined_weight
from llmprune_kernels.reference.wanda import wanda_mask

CONFIGS = [SparsityConfig(0.0), SparsityConfig(0.5), SparsityConfig(0.97), SparsityConfig(n=2, m=4),
           SparsityConfig(n=4, m=8)]
VARIANTS = [{}, {"update_threshold": 0.0}, {"keep_best": False}, {"same_sign": True}, {"same_sign": False},
            {"pow_of_var_regrowing": 0.0, "max_cycles": 7}, {"pow_of_var_regrowing": 2.0, "max_cycles": 200}]


def moments(x: torch.Tensor):
    acc = ActMomentSum(StatisticSpec("act_moments", x.shape[-1], "cpu"))
    acc.add_batch(x)
    return acc.finalize()


def random_layer(rows: int, cols: int, seed: int, dtype=torch.float32):
    """Weights with edge rows (all equal, all zero) and inputs with non-zero means and one dead feature."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[0] = 0.5
    w[1] = 0.0
    x = torch.randn(3, 12, cols, generator=g) * (torch.rand(cols, generator=g) + 0.1) + torch.randn(cols, generator=g)
    x[..., 3] = 0.0
    return w.to(dtype), moments(x)


def method_weight(w, mom, config, updated: bool, seed: int):
    """Wanda's pruned weight, or one whose kept weights were also changed (as SparseGPT's are)."""
    pruned = w.masked_fill(wanda_mask(w, mom.norm_sq, config), 0)
    if updated:
        g = torch.Generator().manual_seed(seed)
        pruned = torch.where(pruned != 0, pruned + 0.3 * torch.randn(w.shape, generator=g).to(w.dtype), pruned)
    return pruned


def expected_error(dense, weight, seq_sum):
    """|e| per row, from the weights in fp64: sum_j (W - W')_ij s_j."""
    return ((dense.double() - weight.double()) * seq_sum.double()).sum(1).abs()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
@pytest.mark.parametrize("dtype,updated", [(torch.float32, False), (torch.float16, True), (torch.bfloat16, False),
                                           (torch.float32, True)])
def test_vectorised_equals_reference(config, dtype, updated):
    for seed in range(2):
        w, mom = random_layer(9, 64, seed, dtype)
        pruned = method_weight(w, mom, config, updated, seed)
        for kw in VARIANTS:
            ref = dsnot_mask_reference(w, pruned, *mom, config, **kw)
            got = dsnot_mask(w, pruned, *mom, config, **kw)
            diff = got.mask != ref
            assert not diff.any(), f"{kw}: {diff.sum()} entries differ, first (row, col): {diff.nonzero()[:8].tolist()}"


@pytest.mark.parametrize("config", CONFIGS[1:], ids=lambda c: c.label)
def test_error_never_grows_and_sparsity_is_kept(config):
    w, mom = random_layer(40, 96, 7)
    swaps = 0
    for updated in (False, True):
        pruned = method_weight(w, mom, config, updated, 7)
        for kw in ({}, {"update_threshold": 0.0}, {"same_sign": False, "max_cycles": 96}):
            res = dsnot_mask(w, pruned, *mom, config, **kw)
            out = refined_weight(w, pruned, res.mask)
            before, after = expected_error(w, pruned, mom.seq_sum), expected_error(w, out, mom.seq_sum)
            tol = 1e-6 * (w.double().abs() * mom.seq_sum.double().abs()).sum(1)  # the fp32 products W s
            assert (after <= before + tol).all()
            assert ((after - res.error_after).abs() <= tol).all()
            assert torch.equal(res.mask, out == 0)
            assert torch.equal(res.mask.sum(1), (pruned == 0).sum(1))
            if config.is_nm:  # every group of M keeps its number of pruned weights
                groups = lambda m: m.view(m.shape[0], -1, config.m).sum(-1)  # noqa: E731
                assert torch.equal(groups(res.mask), groups(pruned == 0))
            regrown = (pruned == 0) & ~res.mask
            assert torch.equal(out[regrown], w[regrown]) and torch.equal(out[~res.mask & ~regrown],
                                                                          pruned[~res.mask & ~regrown])
            swaps += int(res.swaps.sum())
            assert int(regrown.sum()) == int(res.swaps.sum())
    assert swaps > 0


def test_deterministic_and_rows_independent():
    w, mom = random_layer(30, 64, 3)
    pruned = method_weight(w, mom, SparsityConfig(0.6), True, 3)
    a = dsnot_mask(w, pruned, *mom, SparsityConfig(0.6))
    b = dsnot_mask(w, pruned, *mom, SparsityConfig(0.6))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.swaps, b.swaps)
    part = dsnot_mask(w[10:17], pruned[10:17], *mom, SparsityConfig(0.6))
    assert torch.equal(part.mask, a.mask[10:17])


def test_edge_rows_and_bad_input():
    w, mom = random_layer(6, 32, 1)
    pruned = method_weight(w, mom, SparsityConfig(0.5), False, 1)
    res = dsnot_mask(w, pruned, *mom, SparsityConfig(0.5))
    # all-equal weights: every contribution has the sign of its input sum, the pruned half's too; a zero row: none
    assert torch.equal(res.mask[1], torch.ones(32, dtype=torch.bool)) and int(res.swaps[1]) == 0
    assert not res.mask[2:, 3].logical_xor(pruned[2:, 3] == 0).any()  # the dead feature never moves
    assert torch.equal(dsnot_mask(w, pruned, *mom, SparsityConfig(0.5), max_cycles=0).mask, pruned == 0)
    with pytest.raises(ValueError, match="max_cycles=-1 is invalid; allowed: an integer >= 0"):
        dsnot_mask(w, pruned, *mom, SparsityConfig(0.5), max_cycles=-1)
    with pytest.raises(ValueError, match=r"input sums have shape \(31,\), expected \(32,\)"):
        dsnot_mask(w, pruned, mom.seq_sum[:31], mom.var, mom.norm_sq, SparsityConfig(0.5))


def test_moment_statistic_equals_fp64_reference_and_adds_across_shards():
    batches = [torch.randn(2, 9, 24) * 3 + 40, torch.randn(11, 24).half(), torch.randn(1, 5, 24)]
    spec = StatisticSpec("act_moments", 24, "cpu")
    whole, a, b = (make_statistic(spec) for _ in range(3))
    for i, x in enumerate(batches):
        whole.add_batch(x)
        (a if i % 2 else b).add_batch(x)
    for key, t in a.tensors().items():
        t.add_(b.tensors()[key])
    ref = reference_statistic(spec, batches)
    for got in (whole.finalize(), a.finalize()):
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)
    assert whole.nsamples == 4 and whole.finalize() is whole.finalize()
    bad = torch.randn(2, 24)
    bad[0, 5] = float("nan")
    with pytest.raises(ValueError, match="q_proj contains 1 NaN and 0 Inf"):
        make_statistic(spec, "q_proj").add_batch(bad)
    with pytest.raises(ValueError, match="unknown statistic 'act_norm\\+gram'"):
        StatisticSpec("act_norm+gram", 8, "cpu")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude", "gblm"])
def test_zero_cycles_equals_the_method_alone(method):
    ids, cfg = random_ids(4, 16), SparsityConfig(n=2, m=4)
    alone, refined = tiny_model("llama"), tiny_model("llama")
    prune_model(alone, ids if method != "magnitude" else None, method, cfg, progress=False)
    result = prune_model(refined, ids, f"{method}+dsnot", cfg, options={"dsnot_max_cycles": 0, "dsnot_skip": ""},
                         progress=False)
    assert result.method == f"{method}+dsnot" and result.options["dsnot_max_cycles"] == 0
    for (name, p), q in zip(alone.named_parameters(), refined.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("config", [SparsityConfig(0.5), SparsityConfig(n=2, m=4)], ids=lambda c: c.label)
def test_prune_model_refines_attention_and_keeps_sparsity(config):
    ids = random_ids(4, 16)
    dense = {n: p.detach().clone() for n, p in tiny_model("llama").named_parameters()}
    runs = []
    for _ in range(2):
        model = tiny_model("llama")
        result = prune_model(model, ids, "wanda+dsnot", config, progress=False)
        runs.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])  # deterministic
    swaps = 0
    for s in result.linears:
        w = runs[0][f"{s.name}.weight"]
        assert s.sparsity == 0.5 and s.nm_ok in (None, True)
        assert ((w == 0).sum(1) == w.shape[1] // 2).all()
        if ".mlp." in s.name:  # the original code's default skip_layer
            assert s.extra["dsnot_skipped"] is True and "dsnot_swaps" not in s.extra
        else:
            assert s.extra["dsnot_error_after"] <= s.extra["dsnot_error_before"]
            swaps += s.extra["dsnot_swaps"]
    assert swaps > 0
    q = "model.layers.0.self_attn.q_proj.weight"  # layer 0 sees the dense inputs: kept weights are dense values
    kept = runs[0][q] != 0
    assert torch.equal(runs[0][q][kept], dense[q][kept])


def test_refined_statistics_are_shared_per_input():
    model, ids = tiny_model("llama"), random_ids(2, 16)
    step = next(walk_layers(model, capture_layer_inputs(model, ids)))
    for method, kind in (("sparsegpt+dsnot", "hessian+act_moments"), ("magnitude+dsnot", "act_moments")):
        cls = get_method(method)
        pruners = {lin: cls(lin, SparsityConfig(0.5), layer_name=f"{step.name}.{rel}", dsnot_skip="")
                   for rel, lin in prunable_modules(step.layer).items()}
        groups = feed_statistics(step, pruners)
        assert [len(g) for g in groups] == [3, 1, 2, 1] and "q_proj" in groups[0][0]
        assert {p.statistic_spec().kind for p in pruners.values()} == {kind}
        assert all(p.moments is not None and p.moments.nsamples == 2 for p in pruners.values())


def test_method_names_options_and_errors():
    assert get_method("wanda+dsnot") is get_method("wanda+dsnot")
    opts = check_options("sparsegpt+dsnot", {"blocksize": 64, "dsnot_update_threshold": 0})
    assert opts.blocksize == 64 and opts.dsnot_update_threshold == 0.0 and opts.dsnot_max_cycles == 50
    text = describe_methods(["gblm+dsnot"])
    assert "gblm_scale" in text and "dsnot_pow_of_var_regrowing (float, default 1.0)" in text
    with pytest.raises(ValueError, match="unknown refinement 'dsnat' in method 'wanda\\+dsnat'; allowed: dsnot"):
        get_method("wanda+dsnat")
    with pytest.raises(ValueError, match="unknown pruning method 'wandaa'"):
        get_method("wandaa+dsnot")
    with pytest.raises(ValueError, match="method 'sparsellm' cannot be refined"):
        get_method("sparsellm+dsnot")
    with pytest.raises(ValueError, match="refines twice"):
        get_method("wanda+dsnot+dsnot")
    with pytest.raises(ValueError, match="dsnot_max_cycles=-2 is invalid"):
        check_options("wanda+dsnot", {"dsnot_max_cycles": -2})
    with pytest.raises(ValueError, match="unknown option 'dsnot_max_cycle' .*did you mean 'dsnot_max_cycles'"):
        check_options("wanda+dsnot", {"dsnot_max_cycle": 3})
    with pytest.raises(ValueError, match="needs calibration data"):
        prune_model(tiny_model("llama"), None, "magnitude+dsnot", progress=False)


def test_cli_refine_flag(cli_model_dir, tmp_path, capsys):
    rep = tmp_path / "r.json"
    rc = main(["prune", str(cli_model_dir / "model"), "--text", str(cli_model_dir / "text.txt"), "--nsamples", "4",
               "--seqlen", "32", "--device", "cpu", "-q", "--no-eval", "--method", "wanda", "--refine", "dsnot",
               "--pattern", "2:4", "--option", "dsnot_skip=", "--report", str(rep)])
    assert rc == 0
    report = json.loads(rep.read_text())
    assert report["method"] == "wanda+dsnot" and report["options"]["dsnot_skip"] == ""
    assert all(s["nm_ok"] and s["sparsity"] == 0.5 and "dsnot_swaps" in s["extra"] for s in report["linears"])
    assert "wanda+dsnot 2:4" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["prune", "--refine", "nope"])
