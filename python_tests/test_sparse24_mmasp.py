"""mma.sp 2:4 decode kernel: fragment-order layout (round trip), CPU lane emulator == masked dense matmul,
errors; on CUDA the op itself against F.linear for every M in 1..16, the LLaMA-7B shapes, in a CUDA graph."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from llmprune_kernels import library
from llmprune_kernels.sparse24.backends import mmasp as mm
from llmprune_kernels.testing.mmasp_emulator import (emulate_mmasp_linear, mma_sp_m16n8k32, probe_inputs,
                                                       regs_as_int32)
from llmprune_kernels.testing import random_24_weight
from llmprune_kernels.sparse24.pack import pack_24, unpack_24

DTYPES = (torch.float16, torch.bfloat16)
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Within the output dtype's rounding of a fp32-accumulated result (relative to the result's scale)."""
    scale = ref.abs().max().clamp_min(1.0)
    err = (got.float() - ref.float()).abs().max()
    assert err <= TOL[dtype] * scale, f"max error {err:.4g} > {TOL[dtype]} x {scale:.4g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(16, 256), (48, 512), (20, 36), (33, 300), (130, 1100)])
def test_layout_round_trip(shape, dtype):
    packed = pack_24(random_24_weight(*shape, dtype, "cpu"))
    lay = mm.to_mmasp_layout(packed)
    rb, nc = mm.padded_dims(*shape)
    assert tuple(lay.a_frag.shape) == (rb, nc * 8, 32, 8) and tuple(lay.e_frag.shape) == (rb, nc, 32, 4)
    back = mm.from_mmasp_layout(lay)
    assert torch.equal(back.values.view(torch.int16), packed.values.view(torch.int16))
    assert torch.equal(back.meta, packed.meta) and back.shape == packed.shape
    assert torch.equal(unpack_24(back), unpack_24(packed))


def test_layout_lane_registers():
    """Spot check against the PTX fragment definition, independent of the vectorised re-layout."""
    w = random_24_weight(32, 512, torch.float16, "cpu")
    packed = pack_24(w)
    lay = mm.to_mmasp_layout(packed)
    vals = packed.values.reshape(32, 128, 2)
    for b, s, lane in [(0, 0, 0), (1, 3, 7), (1, 15, 31), (0, 9, 18)]:
        g, t = lane // 4, lane % 4
        for reg in range(4):
            row = 16 * b + g + 8 * (reg % 2)
            group = 8 * s + t + 4 * (reg // 2)
            assert torch.equal(lay.a_frag[b, s, lane, 2 * reg: 2 * reg + 2], vals[row, group])
    nib = (packed.meta.long()[:, :, None] >> torch.tensor([0, 4])) & 0xF
    nib = nib.reshape(32, -1)
    words = lay.e_frag.long() & 0xFFFFFFFF
    for b, c, lane, w_ in [(0, 0, 0, 0), (1, 1, 6, 3), (1, 0, 31, 2)]:
        g, t = lane // 4, lane % 4
        s = 8 * c + 2 * w_ + (t >> 1)
        for rh, j in itertools.product(range(2), range(4)):
            want = nib[16 * b + g + 8 * rh, 8 * s + 4 * (t & 1) + j]
            assert (int(words[b, c, lane, w_]) >> (16 * rh + 4 * j)) & 0xF == int(want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,m,config", [
    ((48, 512), 1, (8, 1, 1)), ((48, 512), 3, (4, 2, 2)), ((20, 36), 8, (4, 1, 1)), ((33, 300), 9, (8, 2, 2)),
    ((130, 1100), 16, (4, 2, 4)), ((64, 2048), 5, (4, 1, 8)), ((16, 260), 16, (8, 1, 8)),
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_emulator_matches_masked_dense(shape, m, config, dtype, with_bias):
    w = random_24_weight(*shape, dtype, "cpu")
    x = torch.randn(m, shape[1]).to(dtype)
    bias = torch.randn(shape[0]).to(dtype) if with_bias else None
    got = emulate_mmasp_linear(x, mm.to_mmasp_layout(pack_24(w)), bias, config)
    ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    assert got.dtype == dtype and got.shape == (m, shape[0])
    _close(got, ref, dtype)


def test_emulator_every_m_default_config():
    w = random_24_weight(40, 520, torch.bfloat16, "cpu")
    lay = mm.to_mmasp_layout(pack_24(w))
    for m in range(1, 17):
        x = torch.randn(m, 520).to(torch.bfloat16)
        cfg = mm.default_config(40, 520, m)
        _close(emulate_mmasp_linear(x, lay, None, cfg), F.linear(x.float(), w.float()), torch.bfloat16)


def test_mma_sp_semantics_undefined_metadata():
    inp = probe_inputs(torch.float16)
    d = mma_sp_m16n8k32(inp["a"], inp["b"], inp["e"], 0)
    assert d.shape == (32, 4) and torch.isfinite(d).all()
    bad = inp["e"].clone()
    bad[0] = 0  # nibble 0b0000: both indices 0
    with pytest.raises(ValueError, match="two equal indices"):
        mma_sp_m16n8k32(inp["a"], inp["b"], bad, 0)
    assert regs_as_int32(inp["a"]).shape == (32, 4)


def test_errors():
    w = random_24_weight(32, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        mm.to_mmasp_layout(pack_24(w))
    lay = mm.to_mmasp_layout(pack_24(w.half()))
    with pytest.raises(ValueError, match=r"allowed warps \(4, 8\)"):
        mm.check_config((6, 1, 1))
    with pytest.raises(ValueError, match="splits"):
        emulate_mmasp_linear(torch.randn(2, 64).half(), lay, None, (8, 1, 3))
    with pytest.raises(ValueError, match="1..16"):
        emulate_mmasp_linear(torch.randn(17, 64).half(), lay, None, (8, 1, 1))
    with pytest.raises(ValueError, match="1..16"):
        mm.mmasp_linear(torch.randn(17, 64).half(), lay)
    with pytest.raises(ValueError, match="input features"):
        mm.mmasp_linear(torch.randn(2, 60).half(), lay)
    broken = mm.MmaspLayout(lay.a_frag, lay.e_frag.clone(), lay.shape)
    broken.e_frag[0, 0, 0, 0] = 0
    with pytest.raises(ValueError, match="corrupt mma.sp metadata at row 0"):
        mm.from_mmasp_layout(broken)
    with pytest.raises(ValueError, match="a_frag has shape"):
        mm.from_mmasp_layout(mm.MmaspLayout(lay.a_frag[:, :1], lay.e_frag, lay.shape))
    if not mm.available():
        with pytest.raises(RuntimeError, match="CUDA build"):
            mm.mmasp_linear(torch.randn(2, 64).half(), lay)


def test_default_config():
    assert mm.default_config(4096, 4096) == (8, 1, 8)
    assert mm.default_config(11008, 4096) == (8, 1, 4)
    assert mm.default_config(4096, 11008) == (8, 1, 8)
    assert mm.default_config(16, 256) == (8, 1, 1)  # never more splits than chunks


# ------------------------------------------------------------------------------------------------- CUDA


def _cuda_case(shape, dtype):
    w = random_24_weight(*shape, dtype, "cuda")
    return w, mm.to_mmasp_layout(pack_24(w))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sel", [0, 1])
def test_cuda_probe_matches_emulator(dtype, sel):
    inp = probe_inputs(dtype, seed=sel)
    want = mma_sp_m16n8k32(inp["a"], inp["b"], inp["e"], sel)
    got = mm.probe(regs_as_int32(inp["a"]).cuda(), regs_as_int32(inp["b"]).cuda(), inp["e"].cuda(), sel,
                   dtype == torch.bfloat16).cpu()
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3), f"lanes/elements wrong: {((got - want).abs() > 1e-3).nonzero().tolist()}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008), (40, 300)])
def test_cuda_matches_dense_every_m(shape, dtype):
    w, lay = _cuda_case(shape, dtype)
    bias = torch.randn(shape[0], device="cuda").to(dtype)
    for m in range(1, 17):
        x = torch.randn(m, shape[1], device="cuda").to(dtype)
        if not mm.config_fits(m, shape[1], mm.device_default_config(*shape, m, x.device), x.device):
            assert mm.max_splits(x.device) == 1  # sm_80 code: one CTA per row tile, wide x slices exceed smem
            with pytest.raises(ValueError, match="shared memory"):
                mm.mmasp_linear(x, lay)
            continue
        for b in (None, bias):
            got = mm.mmasp_linear(x, lay, b)
            assert got.shape == (m, shape[0]) and got.dtype == dtype
            _close(got, F.linear(x.float(), w.float(), None if b is None else b.float()), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_every_config(dtype):
    w, lay = _cuda_case((200, 1540), dtype)
    bias = torch.randn(200, device="cuda").to(dtype)
    for m in (1, 8, 9, 16):
        x = torch.randn(m, 1540, device="cuda").to(dtype)
        ref = F.linear(x.float(), w.float(), bias.float())
        for cfg in itertools.product(mm.WARPS, mm.ROWS_PER_WARP, mm.SPLITS):
            if cfg[2] > mm.max_splits(x.device):  # clusters need sm_90 code: refused before any launch
                with pytest.raises(ValueError, match="split"):
                    mm.mmasp_linear(x, lay, bias, config=cfg)
                continue
            _close(mm.mmasp_linear(x, lay, bias, config=cfg), ref, dtype)


@pytest.mark.cuda
def test_cuda_code_arch_decides_splits_and_widths():
    """The loaded code's arch (not the GPU's capability) sets what the kernel may use: sm_90 code runs clusters
    of up to 8 split-K CTAs; sm_80 code (an Ampere build, or its PTX run on a newer GPU) one CTA per row tile,
    and the backend declines widths whose x slice does not fit shared memory at M = 16."""
    from llmprune_kernels import _ext
    from llmprune_kernels.sparse24 import backends

    arch = _ext.ext_cuda_code_arch(torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability()
    assert 800 <= arch <= 100 * major + 10 * minor
    assert mm.max_splits() == (8 if arch >= 900 else 1)
    b = backends.get("mmasp")
    for shape in ((4096, 4096), (4096, 11008)):
        cfg = mm.device_default_config(*shape, 16)
        assert cfg[2] <= mm.max_splits()
        assert b.usable(*shape, torch.float16, torch.device("cuda")) == mm.config_fits(16, shape[1], cfg, 0)
    # a table entry measured with clusters resolves to a config this code runs
    got, _ = b.resolve((8, 1, 8), 4096, 4096, torch.float16, 1, torch.device("cuda"), False)
    assert got[2] <= mm.max_splits()


@pytest.mark.cuda
def test_cuda_graph_and_strided_input():
    dtype = torch.float16
    w, lay = _cuda_case((4096, 4096), dtype)
    x = torch.randn(4, 4096, device="cuda").to(dtype)
    y = mm.mmasp_linear(x, lay)  # warm-up (shared-memory attribute) outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = mm.mmasp_linear(x, lay)
    for _ in range(3):
        x.copy_(torch.randn(4, 4096, device="cuda").to(dtype))
        g.replay()
        torch.cuda.synchronize()
        _close(y, F.linear(x.float(), w.float()), dtype)
    xs = torch.randn(3, 8200, device="cuda").to(dtype)[:, 2:4098]  # row stride 8200, start offset 4 bytes
    _close(mm.mmasp_linear(xs, lay), F.linear(xs.float(), w.float()), dtype)
    # start offset 8 bytes: no copy, 8-byte x loads (16-byte ones need 16-byte aligned rows)
    for m in (3, 16):
        xs = torch.randn(m, 8200, device="cuda").to(dtype)[:, 4:4100]
        _close(mm.mmasp_linear(xs, lay), F.linear(xs.float(), w.float()), dtype)


def test_backward_formula_cpu():
    """The op's autograd formula (dense weight rebuilt from the layout): grad_x = grad @ W, grad_b = sum."""
    from types import SimpleNamespace

    w = random_24_weight(40, 300, torch.float16, "cpu")
    lay = mm.to_mmasp_layout(pack_24(w))
    grad = torch.randn(5, 40).half()
    ctx = SimpleNamespace(saved_tensors=(lay.a_frag, lay.e_frag), shape=(40, 300),
                          needs_input_grad=(True, False, False, False, True, False, False, False))
    gx, *rest = library._mmasp_backward(ctx, grad)
    assert torch.equal(gx, grad @ w)
    assert torch.equal(rest[3], grad.sum(0)) and all(g is None for i, g in enumerate(rest) if i != 3)


@pytest.mark.cuda
def test_cuda_backward_through_op():
    dtype = torch.float16
    w, lay = _cuda_case((256, 1024), dtype)
    x = torch.randn(8, 1024, device="cuda").to(dtype).requires_grad_()
    b = torch.randn(256, device="cuda").to(dtype).requires_grad_()
    (mm.mmasp_linear(x, lay, b).float() ** 2).sum().backward()
    xr, br = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    (F.linear(xr, w, br).float() ** 2).sum().backward()
    _close(x.grad, xr.grad, dtype)
    _close(b.grad, br.grad, dtype)
