"""Mixture-of-experts models with GBLM, streamed from safetensors directories, and ``--min-expert-tokens``.

GBLM's gradient norms of each fused expert matrix are its slice of the 3-D parameter's gradient (only the
tokens routed to that expert reach it); a streamed run converts the per-expert checkpoint tensors into the
fused parameters and back, so it equals the in-memory run bit for bit and writes save_model's names.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import NUM_EXPERTS, random_ids, starve_expert, tiny_model, tiny_tokenizer

from llmprune_kernels import SparsityConfig, prune_model, prune_pretrained
from llmprune_kernels.cli import main
from llmprune_kernels.pipeline.experts import routed_tokens
from llmprune_kernels.pipeline.gradients import collect_gradient_norms
from llmprune_kernels.pipeline.models import find_decoder_layers, prunable_modules
from llmprune_kernels.pipeline.stream import INDEX
from llmprune_kernels.reference.gblm import gblm_mask
from llmprune_kernels.reference.wanda import ActNormStats, mask_from_score

KINDS = ("mixtral", "qwen3-moe")
STARVED = NUM_EXPERTS - 1


def _model(kind: str):
    model = tiny_model(kind)
    starve_expert(model, STARVED)
    return model


def _router_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}


def _pruned_names(model) -> list[str]:
    path, layers = find_decoder_layers(model)
    return [f"{path}.{i}.{rel}" for i, layer in enumerate(layers) for rel in prunable_modules(layer)]


@pytest.mark.parametrize("kind", KINDS)
def test_gblm_gradient_norms_are_each_experts_slice_of_the_fused_gradient(kind):
    model, calib = _model(kind), random_ids(2, 16, seed=1)
    got = collect_gradient_norms(model, list(calib), store_dtype=torch.float32)
    assert list(got.norms) == _pruned_names(model) and not any(n.endswith(".gate") for n in got.norms)
    # Plain autograd over the 3-D parameters, as the reference loop does for a Linear's weight.
    experts = {f"model.layers.{i}.mlp.experts": model.model.layers[i].mlp.experts for i in range(2)}
    acc = {(n, p): torch.zeros_like(getattr(m, p)) for n, m in experts.items() for p in ("gate_up_proj", "down_proj")}
    for ids in calib:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids[None], labels=ids[None]).loss.backward()
        for (n, p), a in acc.items():
            a += (getattr(experts[n], p).grad.float() * 100.0) ** 2
    model.zero_grad(set_to_none=True)
    for (n, p), a in acc.items():
        for e in range(NUM_EXPERTS):
            torch.testing.assert_close(got[f"{n}.{e}.{p}"], a[e].sqrt(), rtol=1e-5, atol=1e-6)
        assert not got[f"{n}.{STARVED}.{p}"].any()  # no token reached it: no gradient
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_gblm_prunes_each_expert_from_its_routed_tokens_and_gradient(kind):
    """Layer 0: calibrated experts get GBLM's mask from their routed tokens' norms and their gradient slice;
    experts below min_expert_tokens (the starved one among them) per-row magnitude; routers stay dense."""
    model, calib = _model(kind), random_ids(2, 48, seed=1)
    grads = collect_gradient_norms(model, list(calib))  # what prepare_model computes (fp16, as the reference)
    block = model.model.layers[0].mlp
    inputs = []
    hd = block.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().reshape(-1, 64)))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    hd.remove()
    (flat,) = inputs
    routed = {e: tok for e, _, tok in routed_tokens(block.gate(flat)[2], NUM_EXPERTS)}
    counts = {e: len(routed.get(e, ())) for e in range(NUM_EXPERTS)}
    threshold = sorted(c for c in counts.values() if c)[0] + 1  # one routed expert falls below it too
    gu = block.experts.gate_up_proj.detach().clone()
    routers = _router_weights(model)
    result = prune_model(model, calib, "gblm", SparsityConfig(0.5), progress=False, min_expert_tokens=threshold)
    assert result.method_report["layers"] == len(result.linears) == len(_pruned_names(model))
    assert result.min_expert_tokens == threshold
    lines = {s.name: s for s in result.linears}
    for e in range(NUM_EXPERTS):
        name = f"model.layers.0.mlp.experts.{e}.gate_up_proj"
        calibrated = counts[e] >= threshold
        assert lines[name].extra.items() >= {"expert": e, "expert_tokens": counts[e],
                                             "expert_rule": "calibrated" if calibrated else "magnitude"}.items()
        if calibrated:
            stats = ActNormStats(64)
            stats.add_batch(flat[routed[e]])
            want = gblm_mask(gu[e], stats.scaler_row, grads[name], SparsityConfig(0.5))
        else:
            want = mask_from_score(gu[e].abs().float(), SparsityConfig(0.5))
        assert torch.equal(block.experts.gate_up_proj[e] == 0, want), e
    assert counts[STARVED] == 0 and lines[f"model.layers.0.mlp.experts.{STARVED}.down_proj"].extra["expert_rule"] \
        == "magnitude"
    for name, w in routers.items():
        assert torch.equal(dict(model.named_parameters())[name], w), name


def _saved(kind: str, folder: Path) -> Path:
    _model(kind).save_pretrained(folder, max_shard_size="100KB")  # a layer's experts span several files
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _file_keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            keys |= set(h.keys())
    return keys


def _line(s):
    """A report line without its timing."""
    return s.name, s.sparsity, s.rel_error, {k: v for k, v in s.extra.items() if not k.endswith("seconds")}


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_moe_equals_in_memory_run_in_the_checkpoints_names(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmprune_kernels.pipeline.save import save_model

    src, ids = _saved(kind, tmp_path / "src"), random_ids(5, 16, seed=2)
    assert len(set(json.loads((src / INDEX).read_text())["weight_map"].values())) > 2
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    expect = prune_model(ref, ids, "sparsegpt", SparsityConfig(n=2, m=4), batch_size=2, progress=False,
                         min_expert_tokens=8)
    got = prune_pretrained(src, tmp_path / "out", ids, "sparsegpt", SparsityConfig(n=2, m=4), batch_size=2,
                           progress=False, min_expert_tokens=8)
    assert [_line(s) for s in got.linears] == [_line(s) for s in expect.linears]
    assert {s.extra["expert_rule"] for s in got.linears if "expert" in s.extra} == {"calibrated", "magnitude"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    want, have = ref.state_dict(), loaded.state_dict()
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)
    save_model(ref, tiny_tokenizer(), tmp_path / "mem")
    names = _file_keys(tmp_path / "out")
    assert names == _file_keys(tmp_path / "mem") == set(json.loads((tmp_path / "out" / INDEX).read_text())["weight_map"])
    assert not any(k.endswith("gate_up_proj") for k in names)  # per-expert tensors, as the source's
    assert names == _file_keys(src)


def test_min_expert_tokens_is_checked_before_any_work(tmp_path, capsys):
    for bad in ("0", "-3", "x"):
        with pytest.raises(SystemExit) as exc:
            main(["prune", "--min-expert-tokens", bad])
        assert exc.value.code == 2
        want = f"{bad!r} is not an integer" if bad == "x" else f"{bad} is invalid; allowed: an integer >= 1"
        assert f"argument --min-expert-tokens: {want}" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"min_expert_tokens 0 is invalid; allowed: an integer >= 1"):
        prune_pretrained(tmp_path / "nowhere", tmp_path / "out", None, "magnitude", min_expert_tokens=0)


@pytest.mark.parametrize("stream", [False, True])
def test_min_expert_tokens_flag_reaches_the_run_and_the_report(cli_model_dir, tmp_path, stream, capsys):
    src = _saved("mixtral", tmp_path / "mixtral")
    out, rep = tmp_path / "out", tmp_path / "report.json"
    args = ["prune", str(src), "--text", str(cli_model_dir / "text.txt"), "--nsamples", "2", "--seqlen", "16",
            "--device", "cpu", "-q", "--method", "wanda", "--pattern", "2:4", "--min-expert-tokens", "1000",
            "--output", str(out), "--report", str(rep), *(["--stream"] if stream else ["--no-eval"])]
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads(rep.read_text())
    assert report["min_expert_tokens"] == 1000
    experts = [s for s in report["linears"] if "expert" in s["extra"]]
    assert len(experts) == 2 * NUM_EXPERTS * 2 and {s["extra"]["expert_rule"] for s in experts} == {"magnitude"}
    assert all(s["nm_ok"] for s in report["linears"])
    assert json.loads((out / "pruning_report.json").read_text())["min_expert_tokens"] == 1000
