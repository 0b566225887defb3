"""Typed method options: declared with type, default and doc, checked once (CLI and API) before any work,
recorded complete in the report; and the magnitude pruner's fast mask (equal to the reference's)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tiny_models import random_ids, tiny_model
from torch import nn

from llmprune_kernels import SparsityConfig, get_method, prune_model
from llmprune_kernels.methods import available_methods, check_options, method_options
from llmprune_kernels.methods.base import options_for_report
from llmprune_kernels.pipeline.models import find_decoder_layers

METHODS = ["admm", "gblm", "magnitude", "sparsegpt", "sparsellm", "wanda"]


def test_every_method_declares_documented_options():
    assert available_methods() == METHODS
    for name in METHODS:
        cls = get_method(name)
        assert dataclasses.is_dataclass(cls.Options), name
        for info in method_options(name):
            assert info.doc and "\n" not in info.doc, (name, info.name)
            assert info.type and info.default == getattr(cls.Options(), info.name)
    by_name = {o.name: o for o in method_options("sparsegpt")}
    assert list(by_name) == ["blocksize", "percdamp", "max_retries", "backend", "tf32", "fast_inverse", "threshold",
                             "quantize"]
    assert by_name["quantize"][1:3] == ("'none' | 'fp8' | 'int8'", "none")
    assert by_name["blocksize"][1:3] == ("int", 128) and by_name["percdamp"][1:3] == ("float", 0.01)
    assert by_name["backend"].type == "'auto' | 'reference' | 'ext'"
    assert by_name["fast_inverse"].type == "bool | None"
    assert {o.name for o in method_options("gblm")} >= {"gblm_scale", "gblm_grad_dtype", "gblm_accumulate_device"}
    assert {o.name for o in method_options("sparsellm")} >= {"alpha", "iterations", "local", "keep_best"}
    assert by_name["threshold"][1:3] == ("'exact' | 'published'", "exact")
    assert [o.name for o in method_options("wanda")] == ["backend"]
    assert [(o.name, o.default) for o in method_options("magnitude")] == [("threshold", "exact")]


def test_defaults_are_filled_in_and_ints_accepted_for_floats():
    opts = check_options("sparsegpt", {"blocksize": 32, "percdamp": 1})
    assert opts == get_method("sparsegpt").Options(blocksize=32, percdamp=1.0)
    assert isinstance(opts.percdamp, float) and opts.max_retries == 4 and opts.backend == "auto"
    assert check_options("sparsegpt", opts) == opts  # an Options instance passes as it is
    assert check_options("wanda", None) == get_method("wanda").Options()


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_misspelt_option_fails_before_any_work(method):
    """The check comes first: the model (a bare object here) is never touched."""
    with pytest.raises(ValueError) as err:
        prune_model(object(), "not even token ids", method, options={"blocksise": 32})
    text = str(err.value)
    assert "'blocksise'" in text and f"method {method!r}" in text and "allowed: " in text
    if method == "sparsegpt":
        assert "did you mean 'blocksize'" in text and "blocksize (int), percdamp (float)" in text
    else:
        assert "allowed: backend ('auto' | 'reference' | 'triton')" in text


@pytest.mark.parametrize("method,options,match", [
    ("sparsegpt", {"blocksize": "abc"}, r"blocksize='abc' of method 'sparsegpt' is not of type int; allowed: "
                                        r"blocksize \(int\)"),
    ("sparsegpt", {"blocksize": 1.5}, r"blocksize=1\.5 .* is not of type int"),
    ("sparsegpt", {"blocksize": True}, r"blocksize=True .* is not of type int"),
    ("sparsegpt", {"tf32": "yes"}, r"tf32='yes' .* is not of type bool"),
    ("sparsegpt", {"percdamp": float("nan")}, r"percdamp=nan .* is not finite"),
    ("sparsegpt", {"backend": "cusolver"}, r"backend='cusolver' .* 'auto' \| 'reference' \| 'ext'"),
    ("sparsegpt", {"blocksize": 0}, r"blocksize=0 is invalid; allowed: an integer >= 1"),
    ("sparsellm", {"iterations": 2.0}, r"iterations=2\.0 .* is not of type int"),
    ("sparsellm", {"local": "magnitude"}, r"local='magnitude' .* 'sparsegpt' \| 'wanda'"),
    ("sparsellm", {"alpha": -1}, r"SparseLLM alpha=-1\.0 is invalid"),
    ("gblm", {"gblm_grad_dtype": "float64"}, r"gblm_grad_dtype='float64'"),
    ("gblm", {"gblm_scale": 0}, r"gblm_scale=0\.0 is invalid"),
    ("gblm", {"gblm_accumulate_device": "gpu0"}, r"gblm_accumulate_device='gpu0' is not a device"),
    ("magnitude", {"blocksize": 8}, r"unknown option 'blocksize' for method 'magnitude'; allowed: threshold"),
    ("magnitude", {"threshold": "paper"}, r"threshold='paper' .* 'exact' \| 'published'"),
    ("wanda", {"layer_name": "x"}, r"unknown option 'layer_name' for method 'wanda'"),  # pipeline-internal
    ("gblm", {"model_info": {}}, r"unknown option 'model_info' for method 'gblm'"),
])
def test_ill_typed_or_out_of_range_values_fail(method, options, match):
    with pytest.raises(ValueError, match=match):
        check_options(method, options)
    with pytest.raises(ValueError, match=match):
        prune_model(tiny_model("llama"), random_ids(2, 16), method, options=options, progress=False)


def test_valid_options_reach_the_pruner_and_the_report():
    model = tiny_model("llama")
    result = prune_model(model, random_ids(4, 16), "sparsegpt", SparsityConfig(0.5), options={"blocksize": 32},
                         progress=False)
    assert result.options == {"blocksize": 32, "percdamp": 0.01, "max_retries": 4, "backend": "auto",
                              "tf32": False, "fast_inverse": None, "threshold": "exact",
                              "quantize": "none"}
    # Unstructured SparseGPT prunes exactly half of every block of `blocksize` columns.
    q = find_decoder_layers(model)[1][0].self_attn.q_proj.weight
    for c in range(0, q.shape[1], 32):
        assert int((q[:, c:c + 32] == 0).sum()) == q.shape[0] * 16
    result = prune_model(tiny_model("llama"), random_ids(4, 16), "wanda", options={"backend": "reference"},
                         progress=False)
    assert result.options == {"backend": "reference"} and all(s.extra["backend"] == "reference"
                                                              for s in result.linears)
    assert prune_model(tiny_model("llama"), None, "magnitude", progress=False).options == {"threshold": "exact"}
    assert prune_model(tiny_model("llama"), random_ids(2, 16), "wanda", progress=False).options == {"backend": "auto"}


def test_gblm_options_reach_the_gradient_pass():
    model = tiny_model("llama")
    opts = check_options("gblm", {"gblm_grad_dtype": "float32", "gblm_scale": 10})
    grads = get_method("gblm").prepare_model(model, random_ids(2, 16), SparsityConfig(0.5), options=opts)
    assert grads.scale == 10.0 and all(g.dtype == torch.float32 for g in grads.values())
    report = options_for_report(check_options("gblm", {"gradients": grads}))
    assert report["gradients"] == f"GradientNorms of {len(grads)} entries" and report["gblm_scale"] == 100.0


def test_pruner_takes_keyword_options_or_an_options_instance():
    cls = get_method("sparsegpt")
    layer = nn.Linear(16, 8)
    assert cls(layer, SparsityConfig(0.5), blocksize=32).options.blocksize == 32
    assert cls(layer, SparsityConfig(0.5), cls.Options(percdamp=0.1), layer_name="x").options.percdamp == 0.1
    with pytest.raises(ValueError, match="unknown option 'blocksise'"):
        cls(layer, SparsityConfig(0.5), blocksise=32)


def _tied_weight(dtype):
    """Random weights with many exact ties, zeros and negative zeros (as dequantized checkpoints have)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 80, generator=g)
    w[:, ::3] = torch.round(w[:, ::3] * 4) / 4
    w[7:12] = torch.randint(-3, 4, (5, 80), generator=g).float()
    w[5], w[6] = 0.0, -0.0
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("target", ["0.0", "0.1", "0.5", "0.73", "0.99", "2:4", "4:8"])
def test_magnitude_pruner_mask_equals_reference(dtype, target):
    from llmprune_kernels.reference.magnitude import magnitude_mask

    config = SparsityConfig.parse(pattern=target) if ":" in target else SparsityConfig.parse(float(target))
    w = _tied_weight(dtype)
    expected = magnitude_mask(w, config)
    if not config.is_nm:
        assert int(expected.sum()) == math.floor(w.numel() * config.sparsity)
    layer = nn.Linear(80, 48, bias=False).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
    get_method("magnitude")(layer, config).prune()
    assert torch.equal(layer.weight.detach(), w.masked_fill(expected, 0))


def test_magnitude_mask_with_nonfinite_weights_equals_reference():
    from llmprune_kernels.methods.magnitude import lowest_global_mask
    from llmprune_kernels.selection import prune_lowest_global

    score = _tied_weight(torch.float32).abs()
    score[3, 4], score[9, 1] = float("nan"), float("inf")
    for k in (0, 1, 100, score.numel() // 2, score.numel() - 1):
        assert torch.equal(lowest_global_mask(score, k), prune_lowest_global(score, k)), k
