"""8-bit activations for 8-bit 2:4 weights (backend ``cslt8``: cuSPARSELt 8-bit x 8-bit, per-token activation
quantisation): the quantisation against its reference, the reference matmul, the opt-in (config, module, CLI) and
its errors, the dispatch never taking the path without the opt-in, the tuning table; on CUDA with cuSPARSELt the
backend against the reference at several M, shapes and dtypes, and the tuned dispatch.

Tolerance of the CUDA path (``check_act``): its error against the fp32 reference (fake-quantised x times the
dequantised weight) is at most 2x PyTorch's own error in the compute dtype (F.linear on that x and weight rounded
to fp16 / bf16) plus two output roundings (2 eps x max |ref|): the fp16 / bf16 intermediate and the scaled output.
"""
from __future__ import annotations


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmprune_kernels import SemiSparseWeightConfig, sparsify_
from llmprune_kernels.reference.sparse24_8bit import (fake_quantize_activations_reference,
                                                      quantize_activations_reference,
                                                      sparse24_8bit_act_linear_reference,
                                                      sparse24_8bit_linear_reference)
from llmprune_kernels.sparse24 import backends, dispatch
from llmprune_kernels.sparse24.backends import cslt8
from llmprune_kernels.sparse24.backends.cslt8 import Cslt8Backend, cslt8_runner, prepare_cslt8, quantize_per_token
from llmprune_kernels.sparse24.linear8 import SparseLinear8
from llmprune_kernels.sparse24.pack import unpack_24
from llmprune_kernels.sparse24.quant8 import OUT_SHIFT, QMAX, activation_scales, dequantize_24, quantize_24
from llmprune_kernels.testing import random_24_weight

QDTYPES = [torch.float8_e4m3fn, torch.int8]
XDTYPES = [torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------- activation quantisation (CPU)
def _fused_runs(fused: bool) -> None:
    if fused and not cslt8.triton_usable("cpu"):
        pytest.skip("the fused kernel on CPU tensors needs Triton under TRITON_INTERPRET=1")


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("xdtype", XDTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("qdtype", QDTYPES, ids=str)
def test_quantize_per_token_is_the_reference_and_bounded(qdtype, xdtype, fused):
    _fused_runs(fused)
    x = torch.randn(37, 1100).to(xdtype)[:, 50:250]  # strided rows; 200 features: a ragged last K block
    x[3] *= 1e-3  # a small token, a large one, an outlier and an all-zero token
    x[5] *= 300.0
    x[7, 11] = 90.0
    x[9] = 0.0
    x[11, :7] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5])  # scale 1 for INT8: ties round to even
    x[13, 0] = 6e4  # a scale clamped so that scale * OUT_SHIFT stays finite in fp16
    x[15] *= 1e-30  # zero in fp16, a scale at the smallest normal in bf16 / fp32
    xq, s = quantize_per_token(x, qdtype, rows=48, fused=fused)
    rq, rs = quantize_activations_reference(x, qdtype)
    assert xq.shape == (48, 200) and xq.dtype == qdtype and s.shape == (37, 1) and s.dtype == xdtype
    assert torch.equal(xq[:37].view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)  # bit for bit
    assert not xq[37:].view(torch.uint8).any()  # padding tokens are zero
    sf = s.float()
    amax = x.float().abs().amax(-1, keepdim=True)
    unclipped = torch.arange(37) != 13
    assert (sf * QMAX[qdtype] >= amax)[unclipped].all() and (s[9] == 1).all()  # all-zero token: scale 1
    assert torch.isfinite((s * OUT_SHIFT[qdtype]).float()).all()  # the output scale is exact in x's dtype
    if qdtype == torch.int8:
        assert xq[11, :7].tolist() == [127, 0, 2, 2, 0, -2, 126]
    err = (fake_quantize_activations_reference(x, qdtype) - x.float()).abs()
    if qdtype == torch.int8:
        assert int(xq.min()) >= -127 and (err <= sf / 2 * (1 + 1e-6)).all()
    else:
        assert (err <= torch.maximum(x.float().abs() / 16, sf / 1024) * (1 + 1e-6)).all()


def test_fused_e4m3_codes_round_like_torch_at_every_midpoint():
    """The fused kernel builds e4m3 codes from fp32 bits: every code, every midpoint between neighbours and the
    floats either side of it, signed zeros and subnormals round as torch's conversion does."""
    _fused_runs(True)
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = codes[torch.isfinite(codes)].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    up, down = torch.full_like(mids, 1e9), torch.full_like(mids, -1e9)
    v = torch.cat([vals, mids, torch.nextafter(mids, up), torch.nextafter(mids, down), torch.tensor([-0.0, 1e-9]),
                   torch.rand(2000) * 0.04 - 0.02]).clamp(-448, 448)
    row = torch.cat([torch.tensor([448.0]), v])[None]  # largest |x| 448: the token's scale is 1
    got, scale = quantize_per_token(row, torch.float8_e4m3fn, fused=True)
    assert float(scale) == 1.0
    assert torch.equal(got[0, 1:].view(torch.uint8), v.to(torch.float8_e4m3fn).view(torch.uint8))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 1300), log_scale=st.floats(-30, 4), seed=st.integers(0, 2**16),
       xdtype=st.sampled_from(XDTYPES + [torch.float32]), qdtype=st.sampled_from(QDTYPES))
def test_fused_quantisation_equals_the_torch_form_on_random_shapes(m, k, log_scale, seed, xdtype, qdtype):
    _fused_runs(True)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 10.0 ** log_scale).to(xdtype)
    rows = -(-m // 16) * 16
    fq, fs = quantize_per_token(x, qdtype, rows=rows, fused=True)
    tq, ts = quantize_per_token(x, qdtype, rows=rows, fused=False)
    assert torch.equal(fq.view(torch.uint8), tq.view(torch.uint8)) and torch.equal(fs, ts)


def test_activation_scales_edges():
    amax = torch.tensor([0.0, 1e-30, 1.0, 448.0, 6e4])
    s = activation_scales(amax, torch.float8_e4m3fn, torch.float16)
    assert s.dtype == torch.float16 and s[0] == 1 and s[1] == torch.finfo(torch.float16).tiny
    assert s[3] == 1 and float(s[2]) >= 1 / 448
    assert float(s[4]) * 512 <= 65504  # fp16 tokens above ~57000 are clipped so s * 512 stays finite
    s32 = activation_scales(amax, torch.int8, torch.float32)
    assert torch.equal(s32[2:4] * 127 >= amax[2:4], torch.tensor([True, True]))


@pytest.mark.parametrize("qdtype", QDTYPES, ids=str)
def test_act_reference_is_fake_quantised_x_times_the_dequantised_weight(qdtype):
    q = quantize_24(random_24_weight(48, 64, torch.float32), qdtype)
    x, b = torch.randn(3, 5, 64), torch.randn(48)
    w = unpack_24(dequantize_24(q))
    ref = sparse24_8bit_act_linear_reference(x, q, b)
    assert torch.equal(ref, F.linear(fake_quantize_activations_reference(x, qdtype), w, b))
    weight_only = sparse24_8bit_linear_reference(x, q, b)
    rel = float((ref - weight_only).abs().max() / weight_only.abs().max())
    assert 0 < rel < (0.1 if qdtype == torch.float8_e4m3fn else 0.03)  # only the activations' rounding differs


# ---------------------------------------------------------------------------------- opt-in and dispatch (CPU)
def _linear(n=64, k=128, dtype=torch.float16, bias=True):
    lin = nn.Linear(k, n, bias=bias, dtype=dtype)
    lin.weight.data = random_24_weight(n, k, dtype)
    return lin


def test_opt_in_is_off_by_default_and_validated():
    assert SemiSparseWeightConfig().activations == "16bit" and SemiSparseWeightConfig(weight_dtype="int8").activations == "16bit"
    assert SparseLinear8(128, 64).activations == "16bit"
    for bad, match in (
            (dict(weight_dtype="int8", activations="int4"),
             r"activations 'int4' is not supported; allowed: '16bit' \(the module's dtype\) or '8bit'"),
            (dict(activations="8bit"), r"activations='8bit' .*allowed with it: weight_dtype='fp8' or 'int8' and "
                                       r"group_size=None"),
            (dict(weight_dtype="fp8", group_size=128, activations="8bit"), r"group_size=128\) .*group_size=None")):
        with pytest.raises(ValueError, match=match):
            SemiSparseWeightConfig(**bad)
    with pytest.raises(ValueError, match=r"activations 'fp16' is not supported; allowed: '16bit'"):
        SparseLinear8(128, 64).activations = "fp16"
    model = sparsify_(nn.Sequential(_linear()), SemiSparseWeightConfig(weight_dtype="int8", activations="8bit"))
    assert model[0].activations == "8bit"
    x = torch.randn(20, 128).half()  # CPU: the weight-only reference (16-bit activations) whatever the opt-in
    assert torch.equal(model[0](x), F.linear(x, model[0].weight, model[0].bias))


def test_dispatch_takes_cslt8_only_when_opted_in_and_measured_faster(monkeypatch):
    monkeypatch.setattr(Cslt8Backend, "usable", lambda self, *a: True)  # as on a GPU with cuSPARSELt
    sl = SparseLinear8.from_linear(_linear(), "int8")
    sl.table = dispatch.TuningTable()
    key = dispatch.act8_key(64, 128, torch.float16, torch.int8)
    sl.table.entries[key] = {32: dispatch.Choice("cslt8", {"cslt8": 1.0, "dense": 2.0}, {"cslt8": 0}),
                             64: dispatch.Choice("dense", {"cslt8": 2.0, "dense": 1.0}, {"cslt8": 0})}
    assert sl.act8_key() is None and sl._act8_choice(32) is None  # not opted in: the table entry is ignored
    sl.activations = "8bit"
    assert sl.act8_key() == key and sl._act8_choice(32).path == "cslt8"
    assert sl._act8_choice(64) is None and sl._act8_choice(16) is None  # the fallback measured faster; decode range
    per_group = SparseLinear8.from_linear(_linear(), "int8", group_size=32)
    per_group.activations, per_group.table = "8bit", sl.table
    assert per_group.act8_key() is None  # per-group scales keep the fallback
    fp32 = SparseLinear8.from_linear(_linear(dtype=torch.float32), "int8")
    fp32.activations = "8bit"
    assert fp32.act8_key() is None
    for other in backends.registered():  # every backend "available": 16-bit modules never get cslt8
        monkeypatch.setattr(type(other), "available", lambda self, device: True)
    cuda = torch.device("cuda")
    for m in (17, 64, 4096):
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            assert dispatch.default_choice(4096, 4096, dt, m, cuda).path != "cslt8"
    b = backends.get("cslt8")
    assert b.serves(17) and not b.serves(16) and not Backend_supports_16bit(b)


def Backend_supports_16bit(b) -> bool:
    return any(b.supports(4096, 4096, dt) for dt in (torch.float16, torch.bfloat16, torch.float32))


def test_table_round_trip_keeps_the_act8_choice(tmp_path):
    t = dispatch.TuningTable()
    key = dispatch.act8_key(4096, 4096, torch.bfloat16, torch.float8_e4m3fn)
    t.entries[key] = {2048: dispatch.Choice("cslt8", {"cslt8": 0.5, "cusparselt": 0.7}, {"cslt8": 2})}
    t.save(tmp_path / "t.json")
    c = dispatch.TuningTable.load(tmp_path / "t.json").lookup_key(key, 1500)
    assert c.path == "cslt8" and c.config() == 2 and c.times_ms["cusparselt"] == 0.7
    assert key == "4096x4096:bfloat16/a8:float8_e4m3fn"


def test_prepare_errors_name_what_does_not_fit():
    with pytest.raises(ValueError, match=r"group_size=32 \(allowed: group_size=None\)"):
        prepare_cslt8(quantize_24(random_24_weight(64, 128, torch.float32), "int8", 32))
    with pytest.raises(ValueError, match=r"needs a CUDA weight with out_features % 32 == 0 .* got \(64, 128\) on cpu"):
        prepare_cslt8(quantize_24(random_24_weight(64, 128, torch.float32), "int8"))
    from llmprune_kernels.sparse24.pack import pack_24

    with pytest.raises(ValueError, match=r"backend 'cslt8' runs 8-bit 2:4 weights"):
        prepare_cslt8(pack_24(random_24_weight(64, 128, torch.float16)))
    assert not backends.get("cslt8").available(torch.device("cpu"))


def test_cli_flag_needs_8bit_weights(cli_model_dir, capsys):
    from llmprune_kernels.cli import main

    args = [str(cli_model_dir / "model"), "--text", str(cli_model_dir / "text.txt"), "--nsamples", "2", "--seqlen",
            "32", "--eval-windows", "1", "--device", "cpu", "-q", "--method", "magnitude", "--pattern", "2:4"]
    assert main(["prune", *args, "--sparse24-activations", "8bit"]) != 0
    assert "--sparse24-activations 8bit quantises activations" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", *args, "--sparse24-weights", "int8", "--sparse24-activations", "fp16"])
    assert "invalid choice: 'fp16' (choose from '16bit', '8bit')" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- CUDA (cuSPARSELt)
HAS_CSLT = torch.cuda.is_available() and cslt8.available()
CUDA_QDTYPES = [torch.int8] + ([torch.float8_e4m3fn] if torch.cuda.is_available()
                               and torch.cuda.get_device_capability() >= (8, 9) else [])
needs_cslt = pytest.mark.skipif(not HAS_CSLT, reason="needs a CUDA GPU and torch built with cuSPARSELt")


def check_act(y, x, q, bias):
    """See the module docstring; prints the first mismatches."""
    ref = sparse24_8bit_act_linear_reference(x, q, bias)
    xf = fake_quantize_activations_reference(x, q.values.dtype)
    w = unpack_24(dequantize_24(q, torch.float32))
    torch_err = (F.linear(xf.to(x.dtype), w.to(x.dtype), bias).float() - ref).abs().max()
    err = (y.float() - ref).abs()
    tol = 2 * torch_err + 2 * torch.finfo(x.dtype).eps * ref.abs().max()
    assert y.dtype == x.dtype and y.shape == ref.shape
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())} outputs off, max error {float(err.max()):.3g} > {float(tol):.3g} "
                           f"(2 x {float(torch_err):.3g} + 2 eps x max|ref|); first at {bad.nonzero()[:5].tolist()}")


@pytest.mark.cuda
@needs_cslt
@pytest.mark.parametrize("xdtype", XDTYPES, ids=str)
@pytest.mark.parametrize("qdtype", CUDA_QDTYPES, ids=str)
@pytest.mark.parametrize("n, k", [(512, 1024), (1536, 576), (4096, 4096)])
def test_cslt8_equals_reference_cuda(qdtype, xdtype, n, k):
    q = quantize_24(random_24_weight(n, k, torch.float32, "cuda"), qdtype)
    state = prepare_cslt8(q)
    b = torch.randn(n, device="cuda").to(xdtype)
    for m in (17, 64, 2048):
        x = torch.randn(m, k, device="cuda").to(xdtype)
        x[1] *= 50.0  # tokens of very different ranges: one scale each
        check_act(cslt8_runner(state, b, m)(x), x, q, b)
        check_act(cslt8_runner(state, None, m)(x), x, q, None)
    x = torch.randn(3, 40, k, device="cuda").to(xdtype)  # 3-D, M = 120 padded to 128
    y = cslt8_runner(state, b, 120)(x)
    assert y.shape == (3, 40, n)
    check_act(y.reshape(120, n), x.reshape(120, k), q, b)


@pytest.mark.cuda
@needs_cslt
@pytest.mark.parametrize("qdtype", CUDA_QDTYPES, ids=str)
def test_cslt8_elementwise_scales_equal_the_alpha_vector_cuda(qdtype, monkeypatch):
    q = quantize_24(random_24_weight(1024, 512, torch.float32, "cuda"), qdtype)
    state = prepare_cslt8(q)
    x, b = torch.randn(300, 512, device="cuda").half(), torch.randn(1024, device="cuda").half()
    assert cslt8.alpha_vector_ok(qdtype, torch.float16, x.device) in (True, False)
    monkeypatch.setattr(cslt8, "alpha_vector_ok", lambda *a: False)
    check_act(cslt8_runner(state, b, 300)(x), x, q, b)


@pytest.mark.cuda
@needs_cslt
@pytest.mark.parametrize("xdtype", XDTYPES, ids=str)
@pytest.mark.parametrize("qdtype", CUDA_QDTYPES, ids=str)
def test_module_dispatch_with_and_without_opt_in_cuda(qdtype, xdtype):
    from test_sparse_linear import _graph_replay

    wd = "fp8" if qdtype == torch.float8_e4m3fn else "int8"
    lins = [_linear(2048, 2048, xdtype).cuda() for _ in range(2)]
    table = dispatch.TuningTable()
    opted = sparsify_(nn.Sequential(lins[0]), SemiSparseWeightConfig(weight_dtype=wd, activations="8bit"),
                      table=table, buckets=(1, 16, 64, 2048))[0]
    plain = sparsify_(nn.Sequential(lins[1]), SemiSparseWeightConfig(weight_dtype=wd), table=table,
                      buckets=(1, 16, 64, 2048))[0]
    entries = table.entries[dispatch.act8_key(2048, 2048, xdtype, qdtype)]
    assert set(entries) == {64, 2048} and all("cslt8" in c.times_ms for c in entries.values())
    for m in (1, 16, 17, 64, 300, 2048):
        x = torch.randn(m, 2048, device="cuda", dtype=xdtype)
        assert plain.choose(m).path != "cslt8"  # never without the opt-in
        path = opted.choose(m).path
        assert path == ("decode8" if m <= 16 else entries[dispatch.bucket(m)].path)
        with torch.no_grad():
            y = opted(x)
            (check_act if path == "cslt8" else _check_weight_only)(y, x, opted.quantized(), opted.bias)
            assert torch.equal(_graph_replay(opted, x), y)  # captured in a CUDA graph: the same bits
    opted.force_path = "cslt8"  # pinned: runs whatever the measurement said
    x = torch.randn(64, 2048, device="cuda", dtype=xdtype)
    with torch.no_grad():
        check_act(opted(x), x, opted.quantized(), opted.bias)


def _check_weight_only(y, x, q, bias):
    ref = sparse24_8bit_linear_reference(x, q, bias)
    assert float((y.float() - ref).abs().max()) <= 4e-2 * float(ref.abs().max())
