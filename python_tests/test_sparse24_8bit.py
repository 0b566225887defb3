"""8-bit 2:4 weights (FP8 e4m3 / INT8 values + scales): quantisation, the decode kernel against the reference
(dequantise, then matmul), SparseLinear8, dispatch, sparsify_, the compressed checkpoint and the CLI flag.
On CPU the kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1): small shapes only."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmprune_kernels import SemiSparseWeightConfig, SparseLinear, load_compressed, save_compressed, sparsify_
from llmprune_kernels.reference.sparse24_8bit import sparse24_8bit_linear_reference
from llmprune_kernels.sparse24 import backends, dispatch
from llmprune_kernels.sparse24.backends import decode8
from llmprune_kernels.sparse24.backends.decode8 import KIND_DOT, KIND_DOT_SWAP as SWAP, sparse24_q8_mm
from llmprune_kernels.sparse24.checkpoint import CheckpointError, dense_state_dict, read_compressed
from llmprune_kernels.sparse24.linear8 import SparseLinear8
from llmprune_kernels.sparse24.pack import mask_24, pack_24, unpack_24
from llmprune_kernels.sparse24.quant8 import QMAX, dequantize_24, dequantize_values, quantize_24, value_groups
from llmprune_kernels.testing import random_24_weight

WDTYPES = ["fp8", "int8"]
XDTYPES = [torch.float16, torch.bfloat16]


def check_kernel(y, x, q, bias):
    """The kernel's error against the fp32 reference is at most 2x PyTorch's own in x's dtype (F.linear on the
    dequantised weight rounded to that dtype), plus one output rounding step."""
    ref = sparse24_8bit_linear_reference(x, q, bias)
    w = unpack_24(dequantize_24(q, x.dtype))
    torch_err = (F.linear(x, w, bias).float() - ref).abs().max()
    err = (y.float() - ref).abs()
    ulp = torch.finfo(x.dtype).eps * ref.abs().max().clamp_min(1.0)
    assert y.dtype == x.dtype and y.shape == ref.shape
    bad = err > 2 * torch_err + ulp
    assert not bad.any(), (f"{int(bad.sum())} outputs off, max error {float(err.max()):.3g} > 2 x {float(torch_err):.3g}"
                           f" + {float(ulp):.3g}; first at {bad.nonzero()[0].tolist()}")


# (n, k, m, bias, group_size, block): dot and dot-swap, split-K with a ragged last slice, odd N and K, the three
# scale modes (per channel; per group with one scale per tile; per value: a group that is no multiple of BLOCK_K).
CASES = [
    (48, 128, 1, True, None, (16, 64, 1)),
    (33, 200, 3, False, None, (16, 32, 2, 4, 1, SWAP)),
    (20, 76, 16, True, 64, (16, 32, 1)),
    (40, 264, 5, True, 128, (32, 64, 3, 4, 1, KIND_DOT)),
    (17, 100, 7, False, 12, (64, 32, 2, 4, 1, SWAP)),
]


@pytest.mark.parametrize("xdtype", XDTYPES, ids=str)
@pytest.mark.parametrize("wdtype", WDTYPES)
@pytest.mark.parametrize("n, k, m, bias, group, block", CASES)
def test_kernel_equals_reference(wdtype, xdtype, n, k, m, bias, group, block, tdevice):
    q = quantize_24(random_24_weight(n, k, torch.float32, tdevice), wdtype, group)
    b = torch.randn(n, device=tdevice).to(xdtype) if bias else None
    x = torch.randn(2, m, k, device=tdevice).to(xdtype)[1]  # a strided view as input
    check_kernel(sparse24_q8_mm(x, q, b, block=block), x, q, b)


# (n, k, m, bias, block) of the stream-select kernel (kind 2): K % 8 == 4 (the last quad half in K), a ragged last
# tile, split-K with a ragged last slice, odd N, tiles of one and of several quads.
STREAM_CASES = [
    (24, 72, 1, True, (8, 64, 1, 4, 1, 2)),
    (33, 100, 2, False, (16, 32, 1, 4, 1, 2)),
    (40, 264, 1, True, (8, 64, 3, 4, 1, 2)),
    (17, 136, 2, True, (4, 128, 2, 2, 1, 2)),
]


@pytest.mark.parametrize("xdtype", XDTYPES, ids=str)
@pytest.mark.parametrize("wdtype", WDTYPES)
@pytest.mark.parametrize("n, k, m, bias, block", STREAM_CASES)
def test_stream_kernel_equals_reference(wdtype, xdtype, n, k, m, bias, block, tdevice):
    q = quantize_24(random_24_weight(n, k, torch.float32, tdevice), wdtype)
    b = torch.randn(n, device=tdevice).to(xdtype) if bias else None
    x = torch.randn(2, m, k, device=tdevice).to(xdtype)[1]
    check_kernel(sparse24_q8_mm(x, q, b, block=block), x, q, b)


def test_stream_kernel_fp8_subnormals_and_extremes(tdevice):
    """Every e4m3 code (subnormals, +-448, signed zero) goes through the kernel's bit moves exactly."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    codes = codes[codes.float().isfinite()]  # e4m3fn's two NaN codes are never produced by quantize_24
    n, k = 8, 2 * codes.numel() // 8 * 8
    vals = codes.float().repeat(n * k // 2 // codes.numel() + 1)[: n * k // 2].reshape(n, k // 2)
    q0 = quantize_24(random_24_weight(n, k, torch.float32, tdevice), "fp8")
    q = decode8.Packed24Q8(vals.to(torch.float8_e4m3fn).to(tdevice), q0.meta, torch.full_like(q0.scale, 0.5), (n, k))
    x = torch.ones(1, k, device=tdevice, dtype=torch.float16)
    check_kernel(sparse24_q8_mm(x, q, None, block=(8, 64, 1, 4, 1, 2)), x, q, None)
    x32 = torch.randn(1, k, device=tdevice, dtype=torch.float32)
    y = sparse24_q8_mm(x32, q, None, block=(8, 64, 1, 4, 1, 2))
    torch.testing.assert_close(y, sparse24_8bit_linear_reference(x32, q, None).float(), rtol=1e-5, atol=1e-5)


def test_tuned_stream_config_on_a_per_group_weight_runs_the_default(tdevice, monkeypatch):
    q = quantize_24(random_24_weight(16, 64, torch.float32, tdevice), "int8", 32)
    x = torch.randn(1, 64, device=tdevice).half()
    runner = decode8.decode8_runner(q, None, 1, (8, 64, 1, 4, 1, 2))  # a tuned stream config, group scales
    check_kernel(runner(x), x, q, None)
    with pytest.raises(ValueError, match="per-channel scales, got M=1, group_size=32"):
        decode8.decode8_runner(q, None, 1, (8, 64, 1, 4, 1, 2), tuned=False)


@pytest.mark.parametrize("m", range(1, 17))
def test_kernel_every_m_up_to_16(m, tdevice):
    wdtype, xdtype = WDTYPES[m % 2], XDTYPES[(m // 2) % 2]  # every combination over the M range
    q = quantize_24(random_24_weight(24, 72, torch.float32, tdevice), wdtype, None if m % 3 else 8)
    x = torch.randn(1, m, 72, device=tdevice).to(xdtype)  # 3-D input
    y = sparse24_q8_mm(x, q)
    assert y.shape == (1, m, 24)
    check_kernel(y[0], x[0], q, None)


def test_kernel_input_errors():
    q = quantize_24(random_24_weight(8, 16, torch.float32), "int8")
    with pytest.raises(ValueError, match="x has 12 input features; the 8-bit 2:4 weight has 16"):
        sparse24_q8_mm(torch.randn(2, 12), q)
    with pytest.raises(TypeError, match=r"x dtype torch.float64 is not supported.*allowed: torch.float16"):
        sparse24_q8_mm(torch.randn(2, 16, dtype=torch.float64), q)
    with pytest.raises(ValueError, match=r"runs kinds 'dot' \(0\), 'dot-swap' \(4\) and 'stream-select' \(2\); got kind 3"):
        sparse24_q8_mm(torch.randn(2, 16).half(), q, block=(8, 64, 1, 4, 1, 3))
    with pytest.raises(ValueError, match="streaming decode kernel takes M <= 2 and per-channel scales, got M=3"):
        sparse24_q8_mm(torch.randn(3, 16).half(), q, block=(8, 64, 1, 4, 1, 2))


# ---------------------------------------------------------------------------------- quantisation
@pytest.mark.parametrize("wdtype", WDTYPES)
@pytest.mark.parametrize("group, sdtype", [(None, "float32"), (None, "float16"), (32, "float32"), (20, "float16")])
def test_quantisation_error_bounds(wdtype, group, sdtype):
    w = random_24_weight(64, 200, torch.float32)
    w[3] *= 1e-3  # a small row, a large one and an outlier: scales are per row (and group)
    w[5] *= 50.0
    w[7, 9] = 0.0 if w[7, 9] == 0 else 300.0
    w[9] = 0.0  # an all-zero row
    q = quantize_24(w, wdtype, group, sdtype)
    p = pack_24(w)
    assert q.values.dtype == {"fp8": torch.float8_e4m3fn, "int8": torch.int8}[wdtype]
    assert q.scale.dtype == getattr(torch, sdtype) and q.scale.shape == (64, 1 if group is None else -(-200 // group))
    assert torch.equal(q.meta, p.meta)  # the 16-bit packing's metadata, bit for bit
    s = q.scale.float()[:, value_groups(200, group)]
    v = p.values.float()
    amax = torch.zeros_like(q.scale.float()).scatter_reduce_(1, value_groups(200, group).expand(64, -1), v.abs(), "amax")
    assert (q.scale.float() * QMAX[q.values.dtype] >= amax).all()  # scales never clip (fp16 ones rounded up)
    assert (q.scale[9] == 1).all()
    err = (dequantize_values(q) - v).abs()
    if wdtype == "int8":
        assert int(q.values.min()) >= -127 and (err <= s / 2 * (1 + 1e-6)).all()
    else:
        assert (err <= torch.maximum(v.abs() / 16, s / 1024) * (1 + 1e-6)).all()
    dense = unpack_24(dequantize_24(q))
    assert torch.equal(dense[w == 0], torch.zeros_like(dense[w == 0]))  # pruned weights stay exactly 0
    assert torch.equal(mask_24(dequantize_24(q)), mask_24(p))


@pytest.mark.parametrize("call, match", [
    (lambda w: quantize_24(w, "fp4"), r"weight dtype 'fp4' is not supported; allowed: 'fp8', 'int8'"),
    (lambda w: quantize_24(w, "int8", 6), r"group_size 6 is not supported; allowed: None .* or a positive multiple of 4"),
    (lambda w: quantize_24(w, "int8", scale_dtype="bfloat16"), r"scale dtype 'bfloat16' .*allowed: 'float32', 'float16'"),
    (lambda w: quantize_24(w.fill_(1.0), "int8"), r"weight is not 2:4 sparse: row 0, group 0"),
    (lambda w: SparseLinear8(16, 8, weight_dtype="uint8"), r"weight dtype 'uint8' is not supported"),
    (lambda w: SparseLinear8(16, 8, dtype=torch.float64), r"compute dtype torch.float64 is not supported"),
])
def test_bad_format_values_name_the_allowed_set(call, match):
    with pytest.raises(ValueError, match=match):
        call(random_24_weight(8, 16, torch.float32))


def test_fp8_refused_on_gpus_without_it(monkeypatch):
    from llmprune_kernels.sparse24 import quant8

    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=8, minor=0))
    assert not quant8.fp8_ok("cuda") and quant8.fp8_ok("cpu")
    with pytest.raises(ValueError, match=r"'fp8' needs a GPU with FP8 .* has 8\.0: use 'int8'"):
        quant8.check_fp8_device(torch.float8_e4m3fn, "cuda")
    quant8.check_fp8_device(torch.int8, "cuda")


# ---------------------------------------------------------------------------------- SparseLinear8
def _linear(n=32, k=64, bias=True, dtype=torch.float32):
    lin = nn.Linear(k, n, bias=bias, dtype=dtype)
    lin.weight.data = random_24_weight(n, k, dtype)
    return lin


@pytest.mark.parametrize("wdtype", WDTYPES)
def test_module_is_the_reference_on_cpu_and_keeps_8bit_through_casts(wdtype):
    lin = _linear()
    sl = SparseLinear8.from_linear(lin, wdtype, 16)
    q = sl.quantized()
    x = torch.randn(3, 5, 64)
    assert torch.equal(sl(x), F.linear(x, unpack_24(dequantize_24(q)), lin.bias))
    assert set(sl.state_dict()) == {"values", "meta", "scale", "bias"}
    values, scale = sl.values.clone(), sl.scale.clone()
    for cast, dt in ((nn.Module.half, torch.float16), (lambda m: m.to(torch.bfloat16), torch.bfloat16),
                     (nn.Module.float, torch.float32)):
        cast(sl)
        assert sl.compute_dtype == dt and sl.bias.dtype == dt
        assert torch.equal(sl.values.view(torch.uint8), values.view(torch.uint8)) and torch.equal(sl.scale, scale)
        assert sl(x.to(dt)).dtype == dt
    with pytest.raises(TypeError, match=r"computes in torch.float32; x is torch.float16"):
        sl(x.half())
    dup = copy.deepcopy(sl)
    assert torch.equal(dup(x), sl(x)) and list(sl._buffers) == ["values", "meta", "scale"]
    other = SparseLinear8(64, 32, weight_dtype="int8" if wdtype == "fp8" else "fp8", group_size=16)
    with pytest.raises(RuntimeError, match=r"values is torch\.\w+; this SparseLinear8 holds"):
        other.load_state_dict(sl.state_dict())


def test_gradients_use_the_dequantised_weight():
    lin = _linear()
    sl = SparseLinear8.from_linear(lin, "int8")
    x = torch.randn(4, 64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    sl(x).sum().backward()
    F.linear(xr, sl.weight, lin.bias.detach()).sum().backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-6) and torch.allclose(sl.bias.grad, torch.full((32,), 4.0))


@pytest.mark.parametrize("wdtype", WDTYPES)
def test_forced_decode8_path_on_cpu_under_the_interpreter(wdtype, tdevice):
    if tdevice.type != "cpu":
        pytest.skip("the CUDA dispatch is tested below")
    sl = SparseLinear8.from_linear(_linear(24, 64, dtype=torch.float16), wdtype)
    sl.force_path = "decode8"
    x = torch.randn(3, 64).half()
    check_kernel(sl(x), x, sl.quantized(), sl.bias)
    with torch.no_grad():
        assert sl.choose(3).path == "decode8" and sl.choose(17).path == "dense"  # above M = 16: the fallback
    fp16 = SparseLinear.from_linear(_linear(24, 64, dtype=torch.float16))
    fp16.force_path = "decode8"
    with pytest.raises(ValueError, match=r"backend 'decode8' runs 8-bit 2:4 weights .*weight_dtype='fp8' or 'int8'"):
        fp16(x)


def test_dispatch_offers_decode8_to_8bit_weights_only(monkeypatch):
    b = backends.get("decode8")
    cuda = torch.device("cuda")
    monkeypatch.setattr(decode8, "fp8_ok", lambda device: True)  # as on an sm_90 GPU
    for dt in (torch.float8_e4m3fn, torch.int8):
        assert b.usable(4096, 4096, dt, cuda) and b.serves(16) and not b.serves(17)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        assert not b.supports(4096, 4096, dt)
    monkeypatch.setattr(decode8, "fp8_ok", lambda device: False)  # no FP8 conversions: the 16-bit fallback runs
    assert not b.usable(4096, 4096, torch.float8_e4m3fn, cuda) and b.usable(4096, 4096, torch.int8, cuda)
    for other in backends.registered():  # every backend "available": 16-bit modules still never get decode8
        monkeypatch.setattr(type(other), "available", lambda self, device: True)
    for m in (1, 4, 16, 64, 4096):
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            assert dispatch.default_choice(4096, 4096, dt, m, cuda).path != "decode8"
    assert "decode8" not in [x.name for x in backends.registered() if x.usable(4096, 4096, torch.float16, cuda)]
    with pytest.raises(ValueError, match="unknown 2:4 backend 'decode9'; registered: .*decode8"):
        SparseLinear8(16, 8).force_path = "decode9"


# ---------------------------------------------------------------------------------- sparsify_, checkpoint, CLI
def _model(dtype=torch.float32):
    model = nn.Sequential(_linear(32, 64, dtype=dtype), nn.ReLU(), _linear(24, 32, False, dtype), nn.Linear(24, 8))
    return model.to(dtype)


@pytest.mark.parametrize("wdtype", WDTYPES)
def test_sparsify_swaps_to_8bit_only_when_asked(wdtype):
    keep = lambda mod, fqn: isinstance(mod, nn.Linear) and fqn != "3"  # noqa: E731
    plain = sparsify_(_model(), SemiSparseWeightConfig(), keep)
    assert type(plain[0]) is SparseLinear and type(plain[2]) is SparseLinear  # no weight_dtype: 16-bit values
    model = _model()
    dense = copy.deepcopy(model)
    sparsify_(model, SemiSparseWeightConfig(weight_dtype=wdtype, group_size=16), keep)
    assert isinstance(model[0], SparseLinear8) and model[0].weight_dtype == wdtype and model[0].group_size == 16
    assert type(model[3]) is nn.Linear
    for i in (0, 2):
        q = quantize_24(dense[i].weight, wdtype, 16)
        assert torch.equal(model[i].values.view(torch.uint8), q.values.view(torch.uint8))
    x = torch.randn(5, 64)
    ref = dense[3](F.linear(F.relu(F.linear(x, model[0].weight, dense[0].bias)), model[2].weight))
    assert torch.equal(model(x), ref)
    for bad, match in ((dict(weight_dtype="bf16"), r"weight_dtype 'bf16' is not supported; allowed: None .*'fp8', "
                                                   r"'int8'"),
                       (dict(group_size=64), r"describe 8-bit weights; allowed with them: weight_dtype='fp8' or 'int8'"),
                       (dict(weight_dtype="int8", group_size=10), r"group_size 10 is not supported")):
        with pytest.raises(ValueError, match=match):
            SemiSparseWeightConfig(**bad)
    broken = _model()
    with pytest.raises(ValueError, match=r"^3: weight is not 2:4 sparse"):  # nothing swapped on a bad weight
        sparsify_(broken, SemiSparseWeightConfig(weight_dtype=wdtype))
    assert all(type(broken[i]) is nn.Linear for i in (0, 2, 3))


def test_sparsify_8bit_covers_fused_moe_experts_and_compiles():
    from tiny_models import tiny_model

    from llmprune_kernels import SparsityConfig, prune_model
    from llmprune_kernels.sparse24.experts import SparseExperts

    model = tiny_model("mixtral")
    prune_model(model, None, "magnitude", SparsityConfig(n=2, m=4), progress=False)
    experts = model.model.layers[1].mlp.experts
    want = [w.detach().clone() for w in (experts.gate_up_proj[2], experts.down_proj[4])]
    with torch.no_grad():  # torchao's default filter picks every Linear, the head too
        model.lm_head.weight.copy_(random_24_weight(*model.lm_head.weight.shape, torch.float32))
    sparsify_(model, SemiSparseWeightConfig(weight_dtype="int8"))
    sparse = model.model.layers[1].mlp.experts
    assert isinstance(sparse, SparseExperts) and all(isinstance(m, SparseLinear8) for m in sparse.linears())
    for got, w in zip((sparse.gate_up[2], sparse.down[4]), want):  # the expert matrices, quantised
        assert torch.equal(got.weight, unpack_24(dequantize_24(quantize_24(w, "int8"), w.dtype)))
    assert isinstance(model.model.layers[0].self_attn.q_proj, SparseLinear8)
    sl = model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, sl.in_features)
    assert torch.equal(torch.compile(sl, backend="aot_eager", fullgraph=True)(x), sl(x))


@pytest.mark.parametrize("wdtype, group, sdtype", [("fp8", None, "float32"), ("int8", 12, "float16")])
def test_checkpoint_round_trip_bit_exact_and_validated(wdtype, group, sdtype, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = _model(torch.float16)
    sparsify_(model, SemiSparseWeightConfig(weight_dtype=wdtype, group_size=group, scale_dtype=sdtype),
              lambda mod, fqn: isinstance(mod, nn.Linear) and fqn != "3")
    save_compressed(model, tmp_path / "ck")
    _, sparse, _ = read_compressed(tmp_path / "ck")
    assert sparse["2"] == {"shape": [24, 32], "dtype": "float16", "bias": False, "weight_dtype": wdtype,
                           "group_size": group, "scale_dtype": sdtype, "activations": "16bit"}
    fresh = load_compressed(_model(torch.float16), tmp_path / "ck")
    assert fresh[0].activations == "16bit"
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype for k in a)
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    assert isinstance(fresh[0], SparseLinear8) and fresh[0].weight_dtype == wdtype and fresh[0].group_size == group
    x = torch.randn(3, 64).half()
    assert torch.equal(fresh(x), model(x))
    assert torch.equal(dense_state_dict(tmp_path / "ck")["0.weight"], model[0].weight)  # dequantised
    file = str(tmp_path / "ck" / "model.sparse24.safetensors")
    with safe_open(file, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for change, match in (
            (lambda s, t: s["0"].update(weight_dtype="fp4"), r"sparse24\['0'\]\.weight_dtype is 'fp4'; allowed: fp8, int8"),
            (lambda s, t: s["0"].update(group_size=6), r"sparse24\['0'\]\.group_size: group_size 6 is not supported"),
            (lambda s, t: s["0"].update(scale_dtype="float64"), r"scale_dtype is 'float64'; allowed: float32, float16"),
            (lambda s, t: s["0"].update(activations="4bit"), r"\.activations is '4bit'; allowed: 16bit, 8bit"),
            (lambda s, t: s["0"].pop("group_size"), r"allowed: an object with exactly 'shape', 'dtype', 'bias'"),
            (lambda s, t: t.update({"0.scale": torch.cat([t["0.scale"]] * 2, 1)}), r"tensor '0\.scale' is stored as"),
            (lambda s, t: t.pop("2.scale"), r"declares tensor '2\.scale', which the file does not store")):
        sp, ts = json.loads(meta["sparse24"]), dict(tensors)
        change(sp, ts)
        bad = tmp_path / "bad.safetensors"
        save_file(ts, str(bad), metadata={**meta, "sparse24": json.dumps(sp)})
        target = _model(torch.float16)
        with pytest.raises(CheckpointError, match=match):
            load_compressed(target, bad)
        assert all(type(target[i]) is nn.Linear for i in (0, 2))


def test_checkpoint_keeps_the_activation_choice(tmp_path):
    """An opted-in ``activations="8bit"`` survives save / load; a file written without the field loads as 16bit."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = _model(torch.float16)
    sparsify_(model, SemiSparseWeightConfig(weight_dtype="int8", activations="8bit"),
              lambda mod, fqn: isinstance(mod, nn.Linear) and fqn != "3")
    save_compressed(model, tmp_path / "ck")
    assert read_compressed(tmp_path / "ck")[1]["0"]["activations"] == "8bit"
    fresh = load_compressed(_model(torch.float16), tmp_path / "ck")
    assert fresh[0].activations == "8bit" and fresh[2].activations == "8bit"
    file = str(tmp_path / "ck" / "model.sparse24.safetensors")
    with safe_open(file, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    sp = json.loads(meta["sparse24"])
    for info in sp.values():
        info.pop("activations")
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**meta, "sparse24": json.dumps(sp)})
    assert load_compressed(_model(torch.float16), old)[0].activations == "16bit"


def test_cli_flag_writes_an_8bit_checkpoint(cli_model_dir, tmp_path, capsys):
    from tiny_models import tiny_model

    from llmprune_kernels.cli import main

    args = [str(cli_model_dir / "model"), "--text", str(cli_model_dir / "text.txt"), "--nsamples", "2", "--seqlen",
            "32", "--eval-windows", "1", "--device", "cpu", "-q", "--method", "magnitude"]
    out = tmp_path / "out"
    assert main(["prune", *args, "--pattern", "2:4", "--sparse24-weights", "int8", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2:4 weights:      int8, 14 SparseLinear8 modules" in printed and "-> pruned" in printed
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["sparse24_weights"]["weight_dtype"] == "int8" and report["sparse24_weights"]["modules"] == 14
    loaded = load_compressed(tiny_model("llama"), out)
    mods = [m for m in loaded.modules() if isinstance(m, SparseLinear8)]
    assert len(mods) == 14 and all(m.values.dtype == torch.int8 for m in mods)
    assert (out / "tokenizer.json").exists()
    for extra, message in ((["--sparsity", "0.5", "--sparse24-weights", "fp8"], "it needs --pattern 2:4 (got 0.5)"),
                           (["--pattern", "2:4", "--sparse24-weights", "fp8", "--stream", "--output", str(tmp_path / "s")],
                            "does not work with --stream")):
        assert main(["prune", *args, *extra]) != 0
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: invalid choice 'fp16' (choose from 'fp8', 'int8')
        main(["prune", *args, "--pattern", "2:4", "--sparse24-weights", "fp16"])
    assert "invalid choice: 'fp16' (choose from 'fp8', 'int8')" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- CUDA
CUDA_WDTYPES = ["int8"] + (["fp8"] if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
                            else [])


@pytest.mark.cuda
@pytest.mark.parametrize("xdtype", XDTYPES, ids=str)
@pytest.mark.parametrize("wdtype", CUDA_WDTYPES)
@pytest.mark.parametrize("n, k, group", [(4096, 4096, None), (520, 1000, None), (1024, 2048, 128), (768, 1536, 96)])
def test_tuned_kernel_every_m_cuda(wdtype, xdtype, n, k, group):
    q = quantize_24(random_24_weight(n, k, torch.float32, "cuda"), wdtype, group)
    b = torch.randn(n, device="cuda").to(xdtype)
    for m in range(1, 17):
        x = torch.randn(m, k, device="cuda").to(xdtype)
        check_kernel(sparse24_q8_mm(x, q, b), x, q, b)  # the measured config for this shape and M
    for cfg in decode8.CANDIDATES:  # every candidate tile, one M
        x = torch.randn(5, k, device="cuda").to(xdtype)
        check_kernel(sparse24_q8_mm(x, q, b, block=cfg), x, q, b)
    for cfg in decode8.STREAM_CONFIGS if group is None else []:  # the CUDA-core kernel, M = 1 and 2
        for m in (1, 2):
            x = torch.randn(m, k, device="cuda").to(xdtype)
            check_kernel(sparse24_q8_mm(x, q, b, block=cfg), x, q, b)


@pytest.mark.cuda
@pytest.mark.parametrize("wdtype", CUDA_WDTYPES)
def test_module_dispatch_graphs_and_fallback_cuda(wdtype):
    from test_sparse_linear import _graph_replay

    model = nn.Sequential(_linear(512, 1024, dtype=torch.float16), nn.ReLU(), _linear(1024, 512, dtype=torch.float16))
    model = sparsify_(model.cuda(), SemiSparseWeightConfig(weight_dtype=wdtype), buckets=(1, 16, 64, 2048))
    sl = model[0]
    assert isinstance(sl, SparseLinear8)
    for m in (1, 7, 16):
        assert sl.choose(m).path == "decode8"
    for m in (17, 64, 2048):
        assert sl.choose(m).path != "decode8"  # the 16-bit 2:4 dispatch on the dequantised weight
    for m in (1, 5, 16, 64, 300, 2048):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            y = sl(x)
        check_kernel(y, x, sl.quantized(), sl.bias)
        assert torch.equal(_graph_replay(sl, x), y)  # captured in a CUDA graph: the same bits
    fp16 = sparsify_(nn.Sequential(_linear(512, 1024, dtype=torch.float16).cuda()), buckets=(1, 16))
    assert all(fp16[0].choose(m).path != "decode8" for m in (1, 16))


@pytest.mark.cuda
def test_checkpoint_loads_onto_cuda_and_runs_decode8(tmp_path):
    wdtype = CUDA_WDTYPES[-1]
    model = sparsify_(nn.Sequential(_linear(256, 512, dtype=torch.float16)), SemiSparseWeightConfig(weight_dtype=wdtype))
    save_compressed(model, tmp_path / "ck")
    fresh = load_compressed(nn.Sequential(nn.Linear(512, 256).half()), tmp_path / "ck").cuda()
    assert fresh[0].values.dtype == model[0].values.dtype and fresh[0].values.is_cuda
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        check_kernel(fresh(x), x, fresh[0].quantized(), fresh[0].bias)
    assert fresh[0].choose(4).path == "decode8"
