"""8-bit mma.sp decode backend ``mmasp8``: fragment layout round trip, the widened registers equal the 16-bit
layout of the unscaled values, the CPU lane emulator on them (with the per-row scales of the kernel's epilogue)
equals the reference, on fixed and random shapes, errors;
on CUDA the op against the reference for every M in 1..16 and every config, in a CUDA graph, and the tuned
dispatch of 8-bit modules between ``decode8`` and ``mmasp8``."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from llmprune_kernels import SemiSparseWeightConfig, sparsify_
from llmprune_kernels.reference.sparse24_8bit import sparse24_8bit_linear_reference
from llmprune_kernels.sparse24 import backends, dispatch
from llmprune_kernels.sparse24.backends import mmasp as mm
from llmprune_kernels.sparse24.backends import mmasp8 as m8
from llmprune_kernels.sparse24.pack import Packed24
from llmprune_kernels.sparse24.quant8 import quantize_24
from llmprune_kernels.testing import random_24_weight
from llmprune_kernels.testing.mmasp_emulator import emulate_mmasp_linear

WDTYPES = ("fp8", "int8")
XDTYPES = (torch.float16, torch.bfloat16)
SHAPES = [(16, 256), (48, 512), (20, 36), (33, 300), (130, 1100)]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    scale = ref.abs().max().clamp_min(1.0)
    err = (got.float() - ref.float()).abs().max()
    assert err <= TOL[dtype] * scale, f"max error {err:.4g} > {TOL[dtype]} x {scale:.4g}"


def _q(shape, wdtype, device="cpu", seed=0):
    torch.manual_seed(seed)
    return quantize_24(random_24_weight(*shape, torch.float32, device), wdtype)


@pytest.mark.parametrize("wdtype", WDTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layout_round_trip(shape, wdtype):
    q = _q(shape, wdtype)
    lay = m8.to_mmasp8_layout(q)
    rb, nc = mm.padded_dims(*shape)
    assert tuple(lay.a_frag.shape) == (rb, nc * 4, 32, 16) and lay.a_frag.dtype == q.values.dtype
    assert tuple(lay.e_frag.shape) == (rb, nc, 32, 4) and lay.scale.shape == (shape[0],)
    assert lay.nbytes() < 0.6 * mm.to_mmasp_layout(Packed24(q.values.float().half(), q.meta, q.shape)).nbytes()
    back = m8.from_mmasp8_layout(lay)
    assert torch.equal(back.values.view(torch.uint8), q.values.view(torch.uint8))
    assert torch.equal(back.meta, q.meta) and torch.equal(back.scale, q.scale.float()) and back.shape == q.shape


@pytest.mark.parametrize("wdtype", WDTYPES)
@pytest.mark.parametrize("xdtype", XDTYPES)
def test_widened_registers_are_the_16bit_fragments(wdtype, xdtype):
    """What the kernel's registers hold after widening = the 16-bit layout of the unscaled values (so every
    index of the 16-bit kernel carries over); e_frag is the 16-bit one."""
    q = _q((48, 1100), wdtype)
    lay = m8.to_mmasp8_layout(q)
    ref16 = mm.to_mmasp_layout(Packed24(q.values.to(xdtype), q.meta, q.shape))
    assert torch.equal(m8.widened_a_frag(lay, xdtype).view(torch.int16), ref16.a_frag.view(torch.int16))
    assert torch.equal(lay.e_frag, ref16.e_frag)


@pytest.mark.parametrize("wdtype", WDTYPES)
@pytest.mark.parametrize("xdtype", XDTYPES)
@pytest.mark.parametrize("shape,m,config", [((48, 512), 1, (8, 1, 1)), ((33, 300), 9, (4, 1, 2)),
                                            ((130, 1100), 16, (8, 1, 4)), ((20, 36), 5, (4, 1, 1)),
                                            ((200, 800), 16, (4, 2, 2)), ((70, 520), 3, (8, 2, 1))])
def test_emulated_kernel_matches_reference(shape, m, config, wdtype, xdtype):
    q = _q(shape, wdtype, seed=m)
    lay = m8.to_mmasp8_layout(q)
    x = torch.randn(m, shape[1]).to(xdtype)
    bias = torch.randn(shape[0]).to(xdtype)
    regs = mm.MmaspLayout(m8.widened_a_frag(lay, xdtype), lay.e_frag, lay.shape)
    got = emulate_mmasp_linear(x, regs, bias, config, row_scale=lay.scale)
    assert got.dtype == xdtype
    _close(got, sparse24_8bit_linear_reference(x, q, bias), xdtype)


@settings(max_examples=12, deadline=None)
@given(out=st.integers(1, 70), quads=st.integers(1, 150), m=st.integers(1, 16), wdtype=st.sampled_from(WDTYPES),
       xdtype=st.sampled_from(XDTYPES), splits=st.sampled_from([1, 2, 4]), rows_per_warp=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_random_shapes_round_trip_and_emulated_kernel(out, quads, m, wdtype, xdtype, splits, rows_per_warp, seed):
    """Random shapes (in a multiple of 4, rows and columns ragged against the 16 x 256 tiles): exact layout round
    trip, and the emulated kernel on the widened registers, times the scales, equals the reference."""
    inp = 4 * quads
    q = _q((out, inp), wdtype, seed=seed)
    lay = m8.to_mmasp8_layout(q)
    back = m8.from_mmasp8_layout(lay)
    assert torch.equal(back.values.view(torch.uint8), q.values.view(torch.uint8)) and torch.equal(back.meta, q.meta)
    x = torch.randn(m, inp, generator=torch.Generator().manual_seed(seed)).to(xdtype)
    regs = mm.MmaspLayout(m8.widened_a_frag(lay, xdtype), lay.e_frag, lay.shape)
    _close(emulate_mmasp_linear(x, regs, None, (4, rows_per_warp, splits), row_scale=lay.scale),
           sparse24_8bit_linear_reference(x, q), xdtype)


def test_errors():
    grouped = quantize_24(random_24_weight(32, 512, torch.float32, "cpu"), "int8", group_size=128)
    with pytest.raises(ValueError, match="group_size=128"):
        m8.to_mmasp8_layout(grouped)
    with pytest.raises(ValueError, match="Packed24Q8"):
        m8.to_mmasp8_layout(Packed24(torch.zeros(16, 128, dtype=torch.float16), torch.zeros(16, 64, dtype=torch.uint8),
                                     (16, 256)))
    lay = m8.to_mmasp8_layout(_q((32, 512), "int8"))
    with pytest.raises(ValueError, match="allowed: torch.float16"):
        m8.mmasp8_linear(torch.randn(2, 512), lay)
    with pytest.raises(ValueError, match="1..16 rows"):
        m8.mmasp8_linear(torch.randn(17, 512, dtype=torch.float16), lay)
    with pytest.raises(ValueError, match="input features"):
        m8.mmasp8_linear(torch.randn(2, 256, dtype=torch.float16), lay)
    with pytest.raises(RuntimeError, match="CUDA build"):
        m8.mmasp8_linear(torch.randn(2, 512, dtype=torch.float16), lay)


def test_backend_takes_only_8bit_per_channel_fp16_bf16():
    b = backends.get("mmasp8")
    assert b.quantized and b.max_m == 16 and b.default_priority is None
    assert b.supports(4096, 4096, torch.float8_e4m3fn) and b.supports(4096, 4096, torch.int8)
    assert not b.supports(4096, 4096, torch.float16) and not b.supports(4096, 4098, torch.int8)
    assert b.accepts(torch.float16) and b.accepts(torch.bfloat16)
    assert not b.accepts(torch.float32) and not b.accepts(torch.float16, group_size=128)
    assert backends.get("decode8").accepts(torch.float32, 128)
    assert not b.usable(4096, 4096, torch.int8, torch.device("cpu"))
    key = dispatch.q8_key(4096, 11008, torch.bfloat16, torch.float8_e4m3fn)
    assert key == "4096x11008:bfloat16/q8:float8_e4m3fn" and key != dispatch.act8_key(4096, 11008, torch.bfloat16,
                                                                                        torch.float8_e4m3fn)


def test_q8_tuning_measures_cold_copies_and_keeps_the_fastest(monkeypatch):
    """tune_shape_q8: weight copies for the 8-bit bytes (together more than the L2), buckets <= 16 only, every
    contender's time and config kept, the fastest chosen per bucket."""
    from llmprune_kernels.sparse24 import tuning, tuning8

    seen = {}

    def copies(nbytes, device):
        seen["nbytes"] = nbytes
        return 3

    monkeypatch.setattr(tuning, "weight_copies", copies)
    for name in tuning8.Q8_DECODE:
        b = backends.get(name)
        monkeypatch.setattr(b, "usable", lambda *a, **k: True)
        monkeypatch.setattr(b, "prepare", lambda q, config=None: q)

        def tune(states, x, out, time_fn, name=name):
            seen["states"], seen["m"] = len(states), x.shape[0]
            return (name, x.shape[0]), None, [lambda: None] * len(states)
        monkeypatch.setattr(b, "tune", tune)
    # decode8 faster at M = 1, mmasp8 at M = 16
    monkeypatch.setattr(tuning, "_retime", lambda cands, reps: {"decode8": 1.0, "mmasp8": 2.0 if seen["m"] == 1 else 0.5})
    choices = tuning8.tune_shape_q8(64, 256, torch.float16, torch.int8, device="cpu", buckets=(1, 16, 64))
    assert seen["nbytes"] == 64 * 256 * 5 // 8 and seen["states"] == 3
    assert set(choices) == {1, 16}
    assert choices[1].path == "decode8" and choices[16].path == "mmasp8"
    assert choices[16].times_ms == {"decode8": 1.0, "mmasp8": 0.5}
    assert choices[16].configs == {"decode8": ("decode8", 16), "mmasp8": ("mmasp8", 16)}


def test_module_takes_the_q8_choice_only_where_the_backend_runs_it(monkeypatch):
    from llmprune_kernels.sparse24.linear8 import SparseLinear8

    monkeypatch.setattr(backends.get("mmasp8"), "usable", lambda *a, **k: True)
    table = dispatch.TuningTable()
    lin = nn.Linear(256, 64, dtype=torch.float16)
    lin.weight.data = random_24_weight(64, 256, torch.float16, "cpu")
    per_channel = SparseLinear8.from_linear(lin, "int8")
    grouped = SparseLinear8.from_linear(lin, "int8", group_size=128)
    for mod in (per_channel, grouped):
        mod.table = table
        table.entries[mod.q8_key()] = {16: dispatch.Choice("mmasp8", {"mmasp8": 1.0, "decode8": 2.0},
                                                           {"mmasp8": (8, 1, 1)})}
    assert per_channel._q8_choice(9).path == "mmasp8" and per_channel._q8_choice(1) is None
    assert grouped._q8_choice(16) is None  # per-group scales: mmasp8 cannot run it
    per_channel.half()
    assert per_channel._q8_choice(16).path == "mmasp8"
    per_channel.float()  # fp32 activations: not mmasp8 (and another table key)
    assert per_channel.q8_key().endswith("float32/q8:int8") and per_channel._q8_choice(16) is None


def test_eager_calls_of_decode8_run_mmasp8_where_it_was_measured(monkeypatch):
    """Outside graph capture a measured decode8 choice runs the C++ mmasp8 op (less launch cost) on per-channel
    fp16 / bf16 modules; per-group modules and unmeasured choices keep decode8."""
    from llmprune_kernels.sparse24.linear8 import SparseLinear8

    monkeypatch.setattr(backends.get("mmasp8"), "usable", lambda *a, **k: True)
    lin = nn.Linear(256, 64, dtype=torch.float16)
    lin.weight.data = random_24_weight(64, 256, torch.float16, "cpu")
    mod, grouped = SparseLinear8.from_linear(lin, "int8"), SparseLinear8.from_linear(lin, "int8", group_size=128)
    measured = dispatch.Choice("decode8", {"decode8": 1.0, "mmasp8": 1.2},
                               {"decode8": (8, 1024, 1, 4, 1, 2), "mmasp8": (8, 1, 1)})
    got = mod._eager(measured, 1)
    assert got.path == "mmasp8" and got.config() == (8, 1, 1)
    assert grouped._eager(measured, 1) is measured
    assert mod._eager(dispatch.pinned("decode8"), 1).path == "decode8"
    assert mod._eager(measured, 17) is measured  # mmasp8 takes M <= 16


# -- CUDA ------------------------------------------------------------------------------------------------------
def _cuda_wdtypes():
    if not torch.cuda.is_available():
        return list(WDTYPES)
    return ["int8"] + (["fp8"] if backends.get("mmasp8").usable(64, 256, torch.float8_e4m3fn, torch.device("cuda"))
                       else [])


def _need_op():
    if not m8.op_available() or not mm.available():
        pytest.skip("no CUDA build of _C with the 8-bit mma.sp op")


@pytest.mark.cuda
@pytest.mark.parametrize("wdtype", _cuda_wdtypes())
@pytest.mark.parametrize("xdtype", XDTYPES)
@pytest.mark.parametrize("shape", [(256, 1024), (200, 1540), (4096, 4096), (11008, 4096)])
def test_cuda_matches_reference_every_m(shape, xdtype, wdtype):
    _need_op()
    q = _q(shape, wdtype, "cuda")
    lay = m8.to_mmasp8_layout(q)
    bias = torch.randn(shape[0], device="cuda").to(xdtype)
    for m in range(1, 17):
        x = torch.randn(m, shape[1], device="cuda").to(xdtype)
        _close(m8.mmasp8_linear(x, lay, bias), sparse24_8bit_linear_reference(x, q, bias), xdtype)


@pytest.mark.cuda
@pytest.mark.parametrize("wdtype", _cuda_wdtypes())
def test_cuda_every_config_graph_and_strided_input(wdtype):
    _need_op()
    b = backends.get("mmasp8")
    q = _q((200, 1540), wdtype, "cuda")
    lay = b.prepare(q)
    for m in (1, 8, 9, 16):
        x = torch.randn(m, 1540, device="cuda").half()
        ref = sparse24_8bit_linear_reference(x, q)
        for cfg in b.candidates(200, 1540, torch.float16, m):
            _close(b.bind(lay, cfg, m, 1540, 200, None)(x), ref, torch.float16)
    x = torch.randn(4, 1540, device="cuda").half()
    run = b.bind(lay, (8, 1, 2), 4, 1540, 200, None)
    run(x)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = run(x)
    x.copy_(torch.randn(4, 1540, device="cuda").half())
    g.replay()
    torch.cuda.synchronize()
    _close(y, sparse24_8bit_linear_reference(x, q), torch.float16)
    xs = torch.randn(3, 1600, device="cuda").half()[:, 2:1542]  # row stride 1600, start offset 4 bytes
    _close(m8.mmasp8_linear(xs, lay), sparse24_8bit_linear_reference(xs, q), torch.float16)


@pytest.mark.cuda
@pytest.mark.parametrize("wdtype", _cuda_wdtypes())
def test_cuda_tuned_dispatch_between_8bit_decode_paths(wdtype, tmp_path):
    """sparsify_ measures decode8 and mmasp8 per bucket <= 16 (kept under the q8 key, saved and loaded with the
    table); the module runs the measured winner and equals the reference."""
    _need_op()
    table = dispatch.TuningTable()
    torch.manual_seed(0)
    lin = nn.Linear(2048, 1024, bias=True, device="cuda", dtype=torch.float16)
    lin.weight.data = random_24_weight(1024, 2048, torch.float16, "cuda")
    model = sparsify_(nn.Sequential(lin), SemiSparseWeightConfig(weight_dtype=wdtype), table=table, buckets=(1, 16, 64))
    mod = model[0]
    entry = table.entries[mod.q8_key()]
    assert set(entry) == {1, 16}
    for m, c in entry.items():
        assert set(c.times_ms) == {"decode8", "mmasp8"} and c.path == min(c.times_ms, key=c.times_ms.get)
        assert mod.choose(m).path == c.path
        x = torch.randn(m, 2048, device="cuda", dtype=torch.float16)
        _close(mod(x), sparse24_8bit_linear_reference(x, mod.quantized(), mod.bias), torch.float16)
    table.save(tmp_path / "t.json")
    loaded = dispatch.TuningTable.load(tmp_path / "t.json")
    assert {m: c.path for m, c in loaded.entries[mod.q8_key()].items()} == {m: c.path for m, c in entry.items()}
