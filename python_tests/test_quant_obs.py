"""8-bit OBS rounding over a fixed mask (``reference.quant_obs``) and SparseGPT's ``quantize`` option: the blocked
computation equals a plain per-column loop, values lie on the 8-bit grid of the per-row scale, the mask never
changes, the layer's output error is below round-to-nearest's, and ``quantize_24`` of the result gives back the
same 8-bit values."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llmprune_kernels.methods import check_options, get_method
from llmprune_kernels.methods.sparsegpt import SparseGPTOptions
from llmprune_kernels.reference.quant_obs import inverse_factor, quantize_nearest, quantize_obs
from llmprune_kernels.reference.sparsegpt import HessianStats, sparsegpt_prune
from llmprune_kernels.sparse24.pack import Packed24, unpack_24
from llmprune_kernels.sparse24.quant8 import QMAX, WEIGHT_DTYPES, dequantize_24, quantize_24
from llmprune_kernels.validation import SparsityConfig

CONFIGS = {"2:4": SparsityConfig(n=2, m=4), "0.5": SparsityConfig(0.5)}


def _inputs(cols: int, tokens: int = 512, seed: int = 0) -> torch.Tensor:
    """Correlated calibration inputs (tokens, cols), as activations are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols) + torch.eye(cols)
    return torch.randn(tokens, cols, generator=g) @ mix


def _hessian(x: torch.Tensor) -> torch.Tensor:
    stats = HessianStats(x.shape[1])
    stats.add_batch(x)
    return stats.H


def _pruned(rows: int, cols: int, config=CONFIGS["2:4"], seed: int = 0):
    x = _inputs(cols, seed=seed)
    H = _hessian(x)
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 1))
    return sparsegpt_prune(W, H, config), H, x


def _loop_reference(W, H, mask, damp, wd):
    """Unblocked: every column updates all later columns at once; the scale (amax / QMAX in fp32, never rounded
    down) and the pinned entry (the row's first largest |w|) computed here."""
    qdtype = WEIGHT_DTYPES[wd]
    qmax = QMAX[qdtype]
    amax = W.float().abs().amax(1)
    s = amax / qmax
    s = torch.where(s * qmax < amax, torch.nextafter(s, torch.tensor(math.inf)), s).double()
    rows, cols = W.shape
    Hd = H.double().clone()
    Hd.diagonal().add_(damp)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    W = W.double().clone()
    pin = W.abs().argmax(1)
    sign = torch.sign(W[torch.arange(rows), pin])
    codes = torch.zeros_like(W)
    for i in range(cols):
        x = W[:, i] / s
        q = x.round().clamp(-qmax, qmax) if qdtype == torch.int8 else x.float().clamp(-qmax, qmax).to(qdtype).double()
        q = torch.where(pin == i, sign * qmax, q)
        q[mask[:, i]] = 0
        err = (W[:, i] - q * s) / U[i, i]
        W[:, i:] -= torch.outer(err, U[i, i:])
        codes[:, i] = q
    return codes


@pytest.mark.parametrize("wd", ["fp8", "int8"])
@pytest.mark.parametrize("rows,cols,blocksize,config", [(8, 40, 16, "2:4"), (12, 100, 32, "0.5"), (5, 68, 128, "2:4"),
                                                        (7, 36, 1, "0.5")])
def test_blocked_equals_unblocked_loop(wd, rows, cols, blocksize, config):
    res, H, _ = _pruned(rows, cols, CONFIGS[config])
    got = quantize_obs(res.weight, H, res.mask, wd, damp=res.damp, blocksize=blocksize, compute_dtype=torch.float64)
    want = _loop_reference(res.weight, H, res.mask, res.damp, wd)
    assert torch.equal(got.codes.double(), want), (got.codes.double() != want).nonzero()[:5]


@pytest.mark.parametrize("wd", ["fp8", "int8"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_values_on_the_grid_of_the_row_scale(wd, config):
    res, H, _ = _pruned(16, 64, CONFIGS[config])
    q = quantize_obs(res.weight, H, res.mask, wd, damp=res.damp, blocksize=32)
    qmax = QMAX[WEIGHT_DTYPES[wd]]
    assert q.codes.dtype == WEIGHT_DTYPES[wd]
    codes = q.codes.float()
    assert torch.equal(q.weight, codes * q.scale)
    assert torch.equal(codes, codes.to(WEIGHT_DTYPES[wd]).float())  # representable (fp8: not rounded again)
    assert bool((codes.abs().amax(1) == qmax).all())  # the pinned entry: row maximum is QMAX * scale
    torch.testing.assert_close(q.scale[:, 0], res.weight.abs().amax(1) / qmax, rtol=2**-23, atol=0)
    assert bool((q.weight[res.mask] == 0).all())
    assert q.zeros == int(((q.weight == 0) & ~res.mask).sum())


@pytest.mark.parametrize("wd", ["fp8", "int8"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_output_error_below_round_to_nearest(wd, config):
    res, H, x = _pruned(48, 128, CONFIGS[config], seed=3)
    obs = quantize_obs(res.weight, H, res.mask, wd, damp=res.damp)
    rtn = quantize_nearest(res.weight, res.mask, wd)
    e_obs = float(((obs.weight - res.weight) @ x.t()).norm())
    e_rtn = float(((rtn - res.weight) @ x.t()).norm())
    assert 0 < e_obs < e_rtn


@pytest.mark.parametrize("wd", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_24_gives_back_the_values(wd, dtype):
    torch.manual_seed(0)
    layer = nn.Linear(96, 24, bias=False).to(dtype)
    pruner = get_method("sparsegpt")(layer, CONFIGS["2:4"], {"quantize": wd}, layer_name="model.layers.0.mlp.up_proj")
    pruner.add_batch(_inputs(96, 256).to(dtype)[None])
    pruner.prune()
    w = layer.weight.data
    assert w.dtype == dtype
    packed = quantize_24(w, wd)
    # Re-quantising recovers the scale within one ulp of fp32 and the 8-bit values exactly.
    s = packed.scale[:, 0]
    amax = w.float().abs().amax(1)
    torch.testing.assert_close(s, amax / QMAX[WEIGHT_DTYPES[wd]], rtol=2**-23, atol=0)
    codes = unpack_24(Packed24(packed.values.float(), packed.meta, packed.shape))
    torch.testing.assert_close(codes * s[:, None], w.float(), rtol=2**-23 if dtype == torch.float32 else 2**-11,
                               atol=0 if dtype == torch.float32 else 2**-25)  # fp16: half a subnormal step
    again = quantize_24(unpack_24(dequantize_24(packed, dtype)), wd)
    assert torch.equal(again.values.float(), packed.values.float())


@pytest.mark.parametrize("wd", ["fp8", "int8"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_pruner_keeps_the_mask(wd, config):
    x = _inputs(128, 256, seed=5)[None]
    weights, reports = {}, {}
    for quantize in ("none", wd):
        torch.manual_seed(1)
        layer = nn.Linear(128, 40, bias=False)
        pruner = get_method("sparsegpt")(layer, CONFIGS[config], {"quantize": quantize, "blocksize": 64},
                                         layer_name="model.layers.0.self_attn.q_proj")
        pruner.add_batch(x)
        reports[quantize] = pruner.prune()
        weights[quantize] = layer.weight.data.clone()
    pruned = weights["none"] == 0
    zeros = weights[wd] == 0
    assert bool(zeros[pruned].all())  # every pruned entry stays zero ...
    assert int((zeros & ~pruned).sum()) == reports[wd]["sparsegpt_quant_zeros"]  # ... the rest is grid zeros
    assert reports[wd]["sparsegpt_quantize"] == wd and reports[wd]["sparsegpt_quant_loss"] > 0
    assert reports["none"]["sparsegpt_loss"] == reports[wd]["sparsegpt_loss"]
    assert "sparsegpt_quantize" not in reports["none"]


def test_pipeline_one_layer_model_keeps_masks():
    """Within a decoder layer every Linear is calibrated before any is pruned: the masks do not move."""
    from tiny_models import random_ids, tiny_config
    from transformers import AutoModelForCausalLM

    from llmprune_kernels import prune_model

    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 1
    masks = {}
    for quantize in ("none", "fp8"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        res = prune_model(model, random_ids(4, 32), "sparsegpt", CONFIGS["2:4"], options={"quantize": quantize},
                          progress=False)
        mods = dict(model.named_modules())
        masks[quantize] = {s.name: (mods[s.name].weight == 0, s.extra.get("sparsegpt_quant_zeros", 0))
                           for s in res.linears}
    assert len(masks["none"]) == 7
    for name, (pruned, _) in masks["none"].items():
        zeros, grid_zeros = masks["fp8"][name]
        assert bool(zeros[pruned].all()) and int((zeros & ~pruned).sum()) == grid_zeros, name


def test_option_errors():
    with pytest.raises(ValueError, match=r"quantize='fp4' of method 'sparsegpt' is not of type 'none' \| 'fp8' \| "
                                         r"'int8'"):
        check_options("sparsegpt", {"quantize": "fp4"})
    with pytest.raises(ValueError, match=r"SparseGPT quantize='bf16' is invalid; allowed: 'none', 'fp8', 'int8'"):
        SparseGPTOptions(quantize="bf16").validate()
    with pytest.raises(ValueError, match=r"quantize='int8' .* refinement 'dsnot' would undo; allowed with a "
                                         r"refinement: quantize='none'"):
        check_options("sparsegpt+dsnot", {"quantize": "int8"})
    assert check_options("sparsegpt", {"quantize": "int8"}).quantize == "int8"
    assert check_options("sparsegpt").quantize == "none"


def test_input_errors():
    res, H, _ = _pruned(8, 32)
    with pytest.raises(ValueError, match=r"mask is \[8, 16\] torch.bool; expected a bool mask of \[8, 32\]"):
        quantize_obs(res.weight, H, res.mask[:, :16], "fp8")
    with pytest.raises(ValueError, match=r"Hessian has shape \(16, 16\), expected \(32, 32\)"):
        quantize_obs(res.weight, H[:16, :16], res.mask, "fp8")
    with pytest.raises(ValueError, match=r"'fp4' is not supported; allowed: 'fp8', 'int8'"):
        quantize_obs(res.weight, H, res.mask, "fp4")
    with pytest.raises(RuntimeError, match="not positive definite"):
        inverse_factor(-torch.eye(4), 0.0)


def test_cli_option_and_8bit_checkpoint(cli_model_dir, tmp_path, capsys):
    import json

    from llmprune_kernels.cli import main

    args = [str(cli_model_dir / "model"), "--text", str(cli_model_dir / "text.txt"), "--nsamples", "2", "--seqlen",
            "32", "--eval-windows", "1", "--device", "cpu", "-q", "--method", "sparsegpt", "--pattern", "2:4"]
    assert main(["prune", *args, "--option", "quantize=fp8", "--sparse24-weights", "int8"]) != 0
    assert ("--option quantize=fp8 rounds the weights for fp8, but --sparse24-weights is int8; allowed: the same "
            "8-bit type in both, or quantize=none") in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["prune", *args, "--option", "quantize=int8", "--sparse24-weights", "int8", "--output", str(out)]) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["options"]["quantize"] == "int8" and report["sparse24_weights"]["weight_dtype"] == "int8"
    assert all(line["extra"]["sparsegpt_quantize"] == "int8" for line in report["linears"])
