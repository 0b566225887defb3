"""Layer-wise pipeline mechanics on tiny random LLaMA / Qwen2 / Mistral models (GQA), plus a few slow
tests on the real SmolLM2-135M (quality ordering, exact sparsity, save + reload)."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from tiny_models import random_ids, tiny_model
from torch import nn

from llmprune_kernels import SparsityConfig
from llmprune_kernels.pipeline.layerwise import capture_layer_inputs, walk_layers
from llmprune_kernels.methods import available_methods, get_method
from llmprune_kernels.methods.base import _REGISTRY, LayerPruner, option, register_method
from llmprune_kernels.pipeline.models import find_decoder_layers, linear_modules
from llmprune_kernels.pipeline import prune_model

KINDS = ["llama", "qwen2", "mistral"]


def _dense_layer_io(model, ids):
    """Inputs and outputs of every decoder layer in a plain forward of the whole model."""
    _, layers = find_decoder_layers(model)
    ins, outs = {}, {}

    def record(i):
        def hook(module, args, kwargs, out):
            ins[i] = (args[0] if args else kwargs["hidden_states"]).clone()
            outs[i] = (out[0] if isinstance(out, tuple) else out).clone()
        return hook

    hooks = [layer.register_forward_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return ins, outs


@pytest.mark.parametrize("kind", KINDS)
def test_capture_gives_first_layer_input_and_call_kwargs(kind, device):
    model = tiny_model(kind).to(device)
    ids = random_ids(5, 24)
    cap = capture_layer_inputs(model, ids, device, batch_size=2)
    assert [h.shape for h in cap.hidden] == [(2, 24, 64), (2, 24, 64), (1, 24, 64)]
    ins, _ = _dense_layer_io(model, ids.to(device))
    torch.testing.assert_close(torch.cat(cap.hidden), ins[0], rtol=0, atol=0)
    _, kwargs = cap.call(0, 0)
    assert "position_embeddings" in kwargs  # transformers 5.x computes rotary embeddings once per model
    assert "past_key_values" not in kwargs
    # The model passes the same objects to every layer: recorded once, shared by both layers.
    assert cap.layer_call[0] == [0, 0]
    # The original layers are back in place and the model still runs.
    assert all(type(layer).__name__.endswith("DecoderLayer") for layer in find_decoder_layers(model)[1])


def test_layers_with_different_masks_get_their_own_kwargs():
    """Sliding-window layers are called with another mask than full-attention layers: both are kept."""
    model = tiny_model("qwen2-sliding")
    cap = capture_layer_inputs(model, random_ids(2, 12))
    assert cap.layer_call == [[0, 1]]
    masks = [cap.call(0, i)[1]["attention_mask"] for i in range(2)]
    assert masks[0] is not masks[1]


@pytest.mark.parametrize("kind", KINDS + ["qwen2-sliding"])
def test_walk_without_pruning_reproduces_dense_forward(kind, device):
    model = tiny_model(kind)
    ids = random_ids(3, 20)
    ins, outs = _dense_layer_io(model.to(device), ids.to(device))
    model.cpu()  # the model lives on the CPU, each layer visits `device`
    cap = capture_layer_inputs(model, ids, device, batch_size=2)
    for step in walk_layers(model, cap, device):
        assert next(step.layer.parameters()).device.type == torch.device(device).type
        torch.testing.assert_close(torch.cat(step.inputs).to(device), ins[step.index], rtol=1e-5, atol=1e-5)
        step.propagate()
        torch.testing.assert_close(torch.cat(step.outputs).to(device), outs[step.index], rtol=1e-5, atol=1e-5)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_sparsity_zero_changes_nothing(device):
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    result = prune_model(model, random_ids(4, 16), "wanda", SparsityConfig(0.0), device=device, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(s.rel_error == 0.0 and s.sparsity == 0.0 for s in result.linears)


def _decoder_linears(model):
    path, layers = find_decoder_layers(model)
    return {f"{path}.{i}.{rel}": lin for i, layer in enumerate(layers) for rel, lin in linear_modules(layer).items()}


def _methods():
    return [m for m in ("magnitude", "wanda", "sparsegpt") if m in available_methods()]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("method", _methods())
@pytest.mark.parametrize("target", ["0.5", "0.3", "2:4", "4:8"])
def test_exact_sparsity_per_linear(kind, method, target, device):
    model = tiny_model(kind)
    lm_head, embed = model.lm_head.weight.clone(), model.model.embed_tokens.weight.clone()
    config = SparsityConfig.parse(pattern=target) if ":" in target else SparsityConfig.parse(float(target))
    result = prune_model(model, random_ids(4, 16), method, config, device=device, progress=False)
    linears = _decoder_linears(model)
    assert [s.name for s in result.linears] == list(linears)
    for stat in result.linears:
        w = linears[stat.name].weight
        assert w.device.type == "cpu"
        rows, cols = w.shape
        if config.is_nm:
            zeros = (w.reshape(rows, cols // config.m, config.m) == 0).sum(-1)
            assert (zeros == config.n).all(), stat.name
            assert stat.nm_ok is True
        elif method == "magnitude":  # one threshold for the whole matrix
            assert int((w == 0).sum()) == math.floor(w.numel() * config.sparsity), stat.name
        elif method == "sparsegpt":  # one mask per block of 128 columns (the reference's blocksize)
            for c in range(0, cols, 128):
                block = w[:, c : c + 128]
                assert int((block == 0).sum()) == math.floor(block.numel() * config.sparsity), stat.name
        else:  # per output row
            assert ((w == 0).sum(1) == math.floor(cols * config.sparsity)).all(), stat.name
        assert stat.sparsity == float((w == 0).sum()) / w.numel()
        assert stat.time_s >= 0
        # Magnitude skips the calibration walk, so it measures no reconstruction error by default.
        assert stat.rel_error is None if method == "magnitude" else 0.0 < stat.rel_error < 1.5
    assert torch.equal(model.lm_head.weight, lm_head) and torch.equal(model.model.embed_tokens.weight, embed)
    assert result.overall_sparsity == pytest.approx(config.sparsity if not config.is_nm else config.n / config.m,
                                                    abs=0.02)


@pytest.fixture
def recording_method():
    """A test-only method that records what its hook saw and prunes nothing."""

    @dataclass(frozen=True)
    class RecorderOptions:
        alpha: int = option(0, "a test option")

    @register_method("_record")
    class Recorder(LayerPruner):
        Options = RecorderOptions
        seen: dict = {}
        prepared = None

        @classmethod
        def prepare_model(cls, model, calibration, config, *, device, options, progress):
            cls.prepared = (type(model).__name__, tuple(calibration.shape), config.label, options, progress)
            return {"hello": 1}

        def add_batch(self, inp):
            self.seen.setdefault(self.layer_name, []).append(inp.clone())

        def prune(self):
            assert self.model_info == {"hello": 1} and self.options.alpha == 3
            with torch.no_grad():
                self.layer.weight[:, 0] = 0  # a visible, tiny change downstream layers must see
            return {"seen_batches": len(self.seen[self.layer_name])}

    Recorder.seen = {}
    yield Recorder
    _REGISTRY.pop("_record", None)


def test_each_layer_sees_outputs_of_already_pruned_layers(recording_method):
    """Sequential pruning: layer i's Linears are fed by layers < i with their pruned weights."""
    model = tiny_model("mistral")
    ids = random_ids(3, 16)
    result = prune_model(model, ids, "_record", SparsityConfig(0.5), batch_size=2, options={"alpha": 3},
                         progress=False)
    assert recording_method.prepared == ("MistralForCausalLM", (3, 16), "0.5", recording_method.Options(alpha=3),
                                         False)
    assert result.options == {"alpha": 3}
    assert all(s.extra == {"seen_batches": 2} for s in result.linears)
    # Re-run the finished (pruned) model: q_proj of layer 1 must get exactly what the pruner saw.
    got = {}
    q1 = model.model.layers[1].self_attn.q_proj
    h = q1.register_forward_hook(lambda m, a, o: got.setdefault("x", a[0].clone()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    seen = torch.cat(recording_method.seen["model.layers.1.self_attn.q_proj"])
    torch.testing.assert_close(seen, got["x"], rtol=1e-5, atol=1e-6)


def test_reconstruction_error_matches_definition():
    model = tiny_model("llama")
    ids = random_ids(2, 16)
    dense_k = model.model.layers[0].self_attn.k_proj.weight.detach().clone()
    result = prune_model(model, ids, "magnitude", SparsityConfig(0.6), measure_error=True, progress=False)
    # Layer 0's k_proj input is the layer-norm of the embeddings: unaffected by any pruning.
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids)).detach()
    w = model.model.layers[0].self_attn.k_proj.weight.detach()
    expect = float(torch.linalg.norm(x @ (dense_k - w).T) / torch.linalg.norm(x @ dense_k.T))
    stat = next(s for s in result.linears if s.name == "model.layers.0.self_attn.k_proj")
    assert stat.rel_error == pytest.approx(expect, rel=1e-4)


def test_batch_size_and_offload_do_not_change_the_result(device):
    ids = random_ids(5, 16)
    ref = tiny_model("qwen2")
    prune_model(ref, ids, "wanda", SparsityConfig(0.5), batch_size=5, device=device, progress=False)
    other = tiny_model("qwen2")
    prune_model(other, ids, "wanda", SparsityConfig(0.5), batch_size=2, device=device, offload_activations=True,
                progress=False)
    for (name, a), b in zip(_decoder_linears(ref).items(), _decoder_linears(other).values()):
        differ = int(((a.weight == 0) != (b.weight == 0)).sum())
        if torch.device(device).type == "cpu":
            assert differ == 0, name
        else:  # GPU GEMMs of other shapes round differently: a near-tie may flip, nothing more
            assert differ <= a.weight.numel() // 500, (name, differ)


def test_model_already_on_device(device):
    model = tiny_model("llama").to(device)
    result = prune_model(model, random_ids(2, 16), "wanda", SparsityConfig(0.5), device=device, progress=False)
    assert all(p.device.type == torch.device(device).type for p in model.parameters())
    assert all(s.sparsity == 0.5 for s in result.linears)


def test_half_precision_model(device):
    dtype = torch.bfloat16 if torch.device(device).type == "cpu" else torch.float16
    model = tiny_model("llama").to(dtype)
    result = prune_model(model, random_ids(2, 16), "wanda", SparsityConfig(n=2, m=4), device=device, progress=False)
    assert all(s.nm_ok for s in result.linears)
    assert all(lin.weight.dtype == dtype for lin in _decoder_linears(model).values())


def test_per_layer_sparsity():
    model = tiny_model("llama")
    result = prune_model(model, random_ids(2, 16), "wanda", SparsityConfig(0.5), layer_sparsity={0: 0.25, 1: 0.75},
                         progress=False)
    by_layer = {0: 0.25, 1: 0.75}
    for s in result.linears:
        layer = int(s.name.split(".")[2])
        assert s.sparsity == pytest.approx(by_layer[layer], abs=1 / 64)
        assert s.target == str(by_layer[layer])
    with pytest.raises(ValueError, match=r"names layer 5; allowed: decoder layer indices 0..1"):
        prune_model(tiny_model("llama"), random_ids(2, 16), "wanda", layer_sparsity={5: 0.5}, progress=False)
    with pytest.raises(ValueError, match=r"cannot be combined with the N:M pattern 2:4"):
        prune_model(tiny_model("llama"), random_ids(2, 16), "wanda", SparsityConfig(n=2, m=4),
                    layer_sparsity=[0.5, 0.5], progress=False)
    with pytest.raises(ValueError, match=r"sparsity 1.2 is outside the allowed range"):
        prune_model(tiny_model("llama"), random_ids(2, 16), "wanda", layer_sparsity=[0.5, 1.2], progress=False)


def test_magnitude_without_calibration():
    model = tiny_model("llama")
    result = prune_model(model, None, "magnitude", SparsityConfig(0.5), progress=False)
    assert all(s.rel_error is None and s.sparsity == 0.5 for s in result.linears)
    with pytest.raises(ValueError, match="method 'wanda' needs calibration data"):
        prune_model(tiny_model("llama"), None, "wanda", progress=False)


@pytest.mark.parametrize("measure_error", [False, True])
def test_last_layer_outputs_are_computed_only_for_its_error(measure_error):
    """Every layer runs its batches twice (statistics, then the pruned outputs for the next layer) except
    the last, whose pruned outputs only its reconstruction error reads."""
    model = tiny_model("llama")
    _, layers = find_decoder_layers(model)
    calls = [0] * len(layers)
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(layers)]
    ref = tiny_model("llama")
    prune_model(ref, random_ids(4, 16), "wanda", SparsityConfig(0.5), batch_size=2, measure_error=True,
                progress=False)
    prune_model(model, random_ids(4, 16), "wanda", SparsityConfig(0.5), batch_size=2, measure_error=measure_error,
                progress=False)
    for h in hooks:
        h.remove()
    assert calls == [4] * (len(layers) - 1) + [4 if measure_error else 2]
    for a, b in zip(_decoder_linears(ref).values(), _decoder_linears(model).values()):
        assert torch.equal(a.weight, b.weight)


def test_magnitude_with_calibration_skips_the_walk(monkeypatch):
    """Magnitude masks do not depend on data: no capture or layer forward unless the error is asked for."""
    import llmprune_kernels.pipeline.prune as pipeline_prune

    ids = random_ids(2, 16)
    ref = tiny_model("llama")
    prune_model(ref, None, "magnitude", SparsityConfig(0.5), progress=False)

    def no_capture(*args, **kwargs):
        raise AssertionError("magnitude ran the calibration walk")

    with monkeypatch.context() as m:
        m.setattr(pipeline_prune, "capture_layer_inputs", no_capture)
        model = tiny_model("llama")
        result = prune_model(model, ids, "magnitude", SparsityConfig(0.5), progress=False)
    assert all(s.rel_error is None and s.sparsity == 0.5 for s in result.linears)
    for a, b in zip(_decoder_linears(ref).values(), _decoder_linears(model).values()):
        assert torch.equal(a.weight, b.weight)
    measured = tiny_model("llama")
    result = prune_model(measured, ids, "magnitude", SparsityConfig(0.5), measure_error=True, progress=False)
    assert all(0 < s.rel_error < 1.5 for s in result.linears)
    for a, b in zip(_decoder_linears(ref).values(), _decoder_linears(measured).values()):
        assert torch.equal(a.weight, b.weight)


def test_bad_inputs_raise_clear_errors():
    ids = random_ids(2, 16)
    with pytest.raises(ValueError, match=r"unknown pruning method 'nope'; allowed: .*wanda"):
        prune_model(tiny_model("llama"), ids, "nope", progress=False)
    with pytest.raises(ValueError, match=r"calibration windows must be a 2-D int64 tensor"):
        prune_model(tiny_model("llama"), ids.float(), "wanda", progress=False)
    with pytest.raises(ValueError, match=r"batch size 0 is invalid"):
        prune_model(tiny_model("llama"), ids, "wanda", batch_size=0, progress=False)
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[ids[0, 3]] = float("nan")
    with pytest.raises(ValueError, match=r"first decoder layer inputs \(embeddings\) contains \d+ NaN"):
        prune_model(model, ids, "wanda", progress=False)
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"model\.layers\.0.* contains \d+ NaN and \d+ Inf"):
        prune_model(model, ids, "wanda", SparsityConfig(0.0), progress=False)


def test_model_without_decoder_layers_is_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(ValueError, match=r"cannot find the decoder layers of Odd"):
        prune_model(Odd(), random_ids(1, 8), "wanda", progress=False)


def test_registry_error_is_the_pipeline_error():
    with pytest.raises(ValueError, match="unknown pruning method"):
        get_method("definitely-not-a-method")


# ----------------------------------------------------------------------------------------------------
# Slow: the real SmolLM2-135M (embedded GGUF, dequantized once and cached on disk).

SLOW_NSAMPLES, SLOW_SEQLEN, SLOW_EVAL_WINDOWS = 8, 256, 8


@pytest.fixture(scope="session")
def smollm2():
    from llmprune_kernels.pipeline import data
    from llmprune_kernels.pipeline.models import load_model

    model, tokenizer = load_model()
    calib, held = data.get_calibration_and_eval(tokenizer, nsamples=SLOW_NSAMPLES, seqlen=SLOW_SEQLEN, seed=0,
                                                eval_max_windows=SLOW_EVAL_WINDOWS)
    return model, tokenizer, calib, held


@pytest.fixture(scope="session")
def smollm2_pruned(smollm2):
    """Each (method, device) at 50% once per session: (model, result, held-out ppl); method None = dense.

    The model stays on the CPU; pruning and evaluation run on ``device`` (layer by layer for pruning).
    """
    from llmprune_kernels.pipeline.evaluate import perplexity

    base, _, calib, held = smollm2
    cache = {}

    def get(method, device="cpu"):
        key = (method, str(device))
        if key not in cache:
            model = copy.deepcopy(base)
            result = None
            if method is not None:
                # Magnitude needs no calibration: the pipeline's data-free path keeps this test lean.
                data = None if method == "magnitude" else calib
                result = prune_model(model, data, method, SparsityConfig(0.5), device=device, progress=False)
            cache[key] = (model, result, perplexity(model, held, device=device))
        return cache[key]

    return get


@pytest.mark.slow
def test_smollm2_quality_order(smollm2_pruned, device):
    """Wanda and SparseGPT at 50% keep perplexity far below magnitude at 50% (papers' finding)."""
    _, _, dense = smollm2_pruned(None, device)
    _, mag_result, mag = smollm2_pruned("magnitude", device)
    _, wanda_result, wanda = smollm2_pruned("wanda", device)
    print(f"\nSmolLM2-135M held-out ppl on {device}: dense {dense:.2f}, magnitude {mag:.2f}, wanda {wanda:.2f}")
    assert dense < wanda < mag
    assert wanda * 2 < mag, (wanda, mag)
    for result in (mag_result, wanda_result):
        assert len(result.linears) == 30 * 7
    if "sparsegpt" not in available_methods():
        pytest.skip("method 'sparsegpt' is not registered yet (llmprune_kernels/methods/sparsegpt.py)")
    _, _, sgpt = smollm2_pruned("sparsegpt", device)
    print(f"sparsegpt {sgpt:.2f}")
    assert dense < sgpt and sgpt * 2 < mag, (sgpt, mag)


def _expected_zeros(dense: torch.Tensor, group: int, n_pruned: int) -> torch.Tensor:
    """Zeros per row group after pruning ``n_pruned`` per group: the dequantized 4-bit SmolLM2 weights hold
    some exact zeros already; their score is 0, so they are pruned first and only a group with more than
    ``n_pruned`` of them ends up sparser."""
    natural = (dense.reshape(dense.shape[0], -1, group) == 0).sum(-1)
    return torch.clamp(natural, min=n_pruned)


@pytest.mark.slow
def test_smollm2_exact_sparsity(smollm2, smollm2_pruned, device):
    """Every pruned Linear of the real model has exactly the requested per-row sparsity."""
    base = smollm2[0]
    model, result, _ = smollm2_pruned("wanda", device)
    linears, dense = _decoder_linears(model), _decoder_linears(base)
    for stat in result.linears:
        w, w0 = linears[stat.name].weight, dense[stat.name].weight
        zeros = (w == 0).sum(1, keepdim=True)
        assert torch.equal(zeros, _expected_zeros(w0, w.shape[1], w.shape[1] // 2)), stat.name
        assert stat.sparsity == pytest.approx(float((w == 0).sum()) / w.numel())


@pytest.mark.slow
def test_smollm2_two_four_pattern(smollm2, device):
    """2:4 with Wanda on the first layers of the real model (enough to check the pattern on real shapes)."""
    base, _, calib, _ = smollm2
    model = copy.deepcopy(base)
    del model.model.layers[3:]
    model.config.num_hidden_layers = 3
    result = prune_model(model, calib[:2], "wanda", SparsityConfig(n=2, m=4), device=device, progress=False)
    assert len(result.linears) == 21 and all(s.nm_ok for s in result.linears)
    dense = _decoder_linears(base)
    for stat, lin in zip(result.linears, _decoder_linears(model).values()):
        rows, cols = lin.weight.shape
        zeros = (lin.weight.reshape(rows, cols // 4, 4) == 0).sum(-1)
        assert torch.equal(zeros, _expected_zeros(dense[stat.name].weight, 4, 2)), stat.name


@pytest.mark.slow
def test_smollm2_saved_model_reloads_with_plain_transformers(smollm2, smollm2_pruned, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmprune_kernels.pipeline.evaluate import perplexity
    from llmprune_kernels.pipeline.save import save_model

    _, tokenizer, _, held = smollm2
    model, _, ppl = smollm2_pruned("wanda", "cpu")
    out = save_model(model, tokenizer, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert perplexity(reloaded, held) == pytest.approx(ppl, rel=1e-5)
    for name, lin in _decoder_linears(reloaded).items():
        assert torch.equal(lin.weight, _decoder_linears(model)[name].weight), name
