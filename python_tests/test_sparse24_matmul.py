"""The Triton 2:4 decode kernel and the cuSPARSELt op against the masked dense reference."""
from __future__ import annotations

import os

import pytest
import torch

from llmprune_kernels.sparse24.backends import decode as s24
from llmprune_kernels.sparse24.backends.decode import sparse24_mm
from llmprune_kernels.reference.sparse24_matmul import sparse24_linear_reference
from llmprune_kernels.sparse24.backends import cusparselt as cslt
from llmprune_kernels.testing import random_24_weight
from llmprune_kernels.sparse24.pack import pack_24, unpack_24

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.fixture
def tdevice(device):
    """Devices Triton can run on here: CUDA, or CPU only under the Triton interpreter."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("CPU tensors need TRITON_INTERPRET=1 (set by conftest when no GPU is present)")
    return device


def check_close(got, x, packed, bias):
    ref = sparse24_linear_reference(x.double(), packed.to(torch.float64), None if bias is None else bias.double())
    scale = ref.abs().max().clamp_min(1.0)
    err = (got.double() - ref).abs().max() / scale
    assert got.dtype == x.dtype and got.shape == ref.shape
    assert err <= TOL[x.dtype], f"relative error {err:.3g} > {TOL[x.dtype]}"


# Small sizes: these run under the Triton interpreter on CPU (well under a second each).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k, m, bias, block", [
    (48, 128, 1, True, (16, 64, 1)), (20, 76, 3, False, (16, 32, 2)), (64, 64, 17, True, (16, 64, 1)),
    (32, 200, 2, True, (32, 64, 3)),  # split-K with a ragged last slice
    (33, 200, 3, True, (16, 32, 2, 4, 1, s24.KIND_DOT_SWAP)),  # W @ x.T, odd N, ragged K, split-K
    (20, 76, 16, False, (64, 64, 1, 4, 1, s24.KIND_DOT_SWAP)),
])
def test_decode_kernel_small(dtype, n, k, m, bias, block, tdevice):
    device = tdevice
    p = pack_24(random_24_weight(n, k, dtype, device))
    b = torch.randn(n, device=device).to(dtype) if bias else None
    x = torch.randn(2, m, k, device=device).to(dtype)[0]  # a strided-batch view as input
    check_close(sparse24_mm(x, p.values, p.meta, b, k, block=block), x, p, b)


# (BLOCK_N, BLOCK_K columns, SPLIT_K): full tiles + a ragged tail, split-K, odd N, M up to 16, and a tile
# whose [M, N, G] accumulator is reduced every tile (ACC3 off: 16 * 16 * 64 > 4096).
STREAM_CASES = [
    (33, 200, 1, True, (16, 64, 1)), (20, 76, 3, False, (8, 32, 2)), (48, 136, 16, True, (4, 32, 1)),
    (17, 256, 16, True, (16, 256, 1)), (32, 200, 2, False, (16, 128, 3)),
]


@pytest.mark.parametrize("kind", [s24.KIND_SELECT, s24.KIND_EXPAND])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k, m, bias, block", STREAM_CASES)
def test_stream_kernel_small(kind, dtype, n, k, m, bias, block, tdevice):
    """The CUDA-core streaming kernels (select / expand) against the reference."""
    p = pack_24(random_24_weight(n, k, dtype, tdevice))
    b = torch.randn(n, device=tdevice).to(dtype) if bias else None
    x = torch.randn(m, k, device=tdevice).to(dtype)
    check_close(sparse24_mm(x, p.values, p.meta, b, k, block=block + (4, 1, kind)), x, p, b)


def test_stream_kernel_misaligned_values(tdevice):
    """Values whose int32 pair view is impossible (odd storage offset) are copied, not misread."""
    p = pack_24(random_24_weight(16, 64, torch.float16, tdevice))
    buf = torch.empty(p.values.numel() + 1, device=tdevice, dtype=torch.float16)
    odd = buf[1:].view_as(p.values)
    odd.copy_(p.values)
    x = torch.randn(2, 64, device=tdevice).half()
    check_close(sparse24_mm(x, odd, p.meta, None, 64, block=(16, 64, 1, 4, 1, s24.KIND_SELECT)), x, p, None)


def test_decode_kernel_rejects_bad_configs(tdevice):
    p = pack_24(random_24_weight(32, 64, torch.float16, tdevice))
    with pytest.raises(ValueError, match="M <= 16 and 16-bit"):
        sparse24_mm(torch.randn(17, 64, device=tdevice).half(), p.values, p.meta, None, 64,
                    block=(8, 32, 1, 4, 1, s24.KIND_SELECT))
    p32 = pack_24(random_24_weight(32, 64, torch.float32, tdevice))
    with pytest.raises(ValueError, match="M <= 16 and 16-bit"):
        sparse24_mm(torch.randn(1, 64, device=tdevice), p32.values, p32.meta, None, 64,
                    block=(8, 32, 1, 4, 1, s24.KIND_EXPAND))
    with pytest.raises(ValueError, match="kind 1 is unknown"):
        sparse24_mm(torch.randn(1, 64, device=tdevice).half(), p.values, p.meta, None, 64, block=(32, 64, 1, 4, 1, 1))


def test_candidate_configs_are_well_formed():
    """Every tuning candidate names a known kernel with a legal tile; the stream kernel only for 16-bit
    weights and M <= 2 (expand is not tuned), and every config has a readable name for the reports."""
    for m in (1, 2, 4, 8, 16, 64):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            cands = s24.candidates(m, dtype)
            assert len(cands) == len(set(cands)) and len(cands) <= 16
            for cfg in cands:
                bn, bk, split, warps, stages, kind = cfg
                assert kind in s24.KIND_NAMES and split >= 1 and warps in (1, 2, 4, 8) and bk % 16 == 0
                assert bn & (bn - 1) == 0 and bk & (bk - 1) == 0
                if kind in (s24.KIND_SELECT, s24.KIND_EXPAND):
                    assert dtype != torch.float32 and m <= s24.STREAM_TUNE_MAX_M
                assert s24.config_name(cfg).startswith(s24.KIND_NAMES[kind])
            kinds = {c[-1] for c in cands}
            assert (s24.KIND_SELECT in kinds) == (dtype != torch.float32 and m <= s24.STREAM_TUNE_MAX_M)
            assert {s24.KIND_DOT, s24.KIND_DOT_SWAP} <= kinds and s24.KIND_EXPAND not in kinds


def test_every_fp16_candidate_runs_under_the_interpreter(tdevice):
    """Each candidate config (big tiles, masks over a small weight) gives the reference result."""
    n, k = 40, 264
    p = pack_24(random_24_weight(n, k, torch.float16, tdevice))
    b = torch.randn(n, device=tdevice).half()
    for m in (1, 3):
        x = torch.randn(m, k, device=tdevice).half()
        for cfg in s24.candidates(m, torch.float16):
            check_close(sparse24_mm(x, p.values, p.meta, b, k, block=cfg), x, p, b)


def test_decode_runner_matches_sparse24_mm(tdevice):
    """The bound per-M call SparseLinear keeps gives the same bits as a full sparse24_mm call."""
    for cfg in [(16, 64, 1, 4, 1, s24.KIND_DOT), (16, 64, 2, 4, 1, s24.KIND_SELECT)]:
        p = pack_24(random_24_weight(24, 128, torch.float16, tdevice))
        b = torch.randn(24, device=tdevice).half()
        run = s24.decode_runner(p.values, p.meta, b, 6, 128, cfg)
        x = torch.randn(2, 3, 128, device=tdevice).half()
        y = run(x)
        assert y.shape == (2, 3, 24)
        assert torch.equal(y, sparse24_mm(x, p.values, p.meta, b, 128, block=cfg))
        assert torch.equal(run(x.reshape(6, 128)), y.reshape(6, 24))
        with pytest.raises(TypeError, match="differs from the weight dtype"):
            run(x.float())


def test_decode_kernel_leading_dims_and_errors(tdevice):
    device = tdevice
    p = pack_24(random_24_weight(32, 64, torch.float32, device))
    x = torch.randn(2, 3, 64, device=device)
    y = sparse24_mm(x, p.values, p.meta, None, 64, block=(16, 64, 1))
    assert y.shape == (2, 3, 32)
    check_close(y.reshape(6, 32), x.reshape(6, 64), p, None)
    with pytest.raises(ValueError, match="x has 60 input features"):
        sparse24_mm(torch.randn(2, 60, device=device), p.values, p.meta, None, 64)
    with pytest.raises(TypeError, match="differs from the weight dtype"):
        sparse24_mm(x.half(), p.values, p.meta, None, 64)


def test_decode_custom_op_opcheck(tdevice):
    device = tdevice
    p = pack_24(random_24_weight(32, 64, torch.float32, device))
    x = torch.randn(3, 64, device=device)
    b = torch.randn(32, device=device)
    torch.library.opcheck(torch.ops.llmprune_kernels.sparse24_mm.default, (x, p.values, p.meta, b, 64),
                          test_utils=("test_schema", "test_faketensor"))


def test_decode_custom_op_backward(tdevice):
    """Gradients for x and bias through the op equal those of the dense Linear (the weight is frozen); this is
    what torch.compile traces when the bias is a Parameter that requires grad."""
    p = pack_24(random_24_weight(32, 64, torch.float32, tdevice))
    x = torch.randn(2, 3, 64, device=tdevice, requires_grad=True)
    b = torch.randn(32, device=tdevice, requires_grad=True)
    y = torch.ops.llmprune_kernels.sparse24_mm(x, p.values, p.meta, b, 64)
    g = torch.randn_like(y)
    y.backward(g)
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, unpack_24(p), b2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    torch.library.opcheck(torch.ops.llmprune_kernels.sparse24_mm.default, (x, p.values, p.meta, b, 64),
                          test_utils=("test_autograd_registration",))


LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k", LLAMA_SHAPES + [(576, 1536)])
@pytest.mark.parametrize("m", [1, 2, 3, 16])
def test_every_candidate_full_size_cuda(dtype, n, k, m):
    """Every config the tuner may pick, at the LLaMA-7B shapes, against the reference (without bias, as
    the tuner runs them, so the compiled kernels are shared with the benchmark; one with bias)."""
    p = pack_24(random_24_weight(n, k, dtype, "cuda"))
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype)
    for cfg in s24.candidates(m, dtype):
        check_close(sparse24_mm(x, p.values, p.meta, None, k, block=cfg), x, p, None)
    check_close(sparse24_mm(x, p.values, p.meta, b, k, block=s24.candidates(m, dtype)[-1]), x, p, b)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", [s24.KIND_SELECT, s24.KIND_EXPAND])
@pytest.mark.parametrize("m", [8, 16])
def test_stream_kernel_up_to_m16_cuda(kind, m):
    """M above the tuning range still runs correctly (per-tile reduction for the larger accumulators)."""
    n, k = 4096, 4096
    p = pack_24(random_24_weight(n, k, torch.float16, "cuda"))
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    for block in [(8, 512, 1, 4, 1, kind), (16, 256, 2, 4, 1, kind)]:
        check_close(sparse24_mm(x, p.values, p.meta, None, k, block=block), x, p, None)


@pytest.mark.cuda
def test_tune_config_records_every_candidate():
    n, k = 1024, 2048
    cfg = s24.tune_config(n, k, torch.float16, 1, "cuda")
    times = s24.TUNE_TIMES[(n, k, torch.float16, 1)]
    assert cfg in times and times[cfg] == min(times.values())
    assert set(times) <= set(s24.candidates(1, torch.float16)) and len(times) >= 8
    assert s24.tuned_config(n, k, torch.float16, 1) == cfg


needs_cslt = pytest.mark.skipif(not cslt.available(), reason="our cuSPARSELt op is not built / no GPU")


@pytest.mark.cuda
@needs_cslt
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 16, 64, 300, 2048])
def test_cusparselt_linear_matches_reference(dtype, m):
    n, k = 256, 512
    w = random_24_weight(n, k, dtype, "cuda")
    p = pack_24(w)
    comp = cslt.compress(w)
    b = torch.randn(n, device="cuda", dtype=dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    check_close(cslt.linear(x, comp, n, b), x, p, b)
    # The first configs give the same product (ids >= 36 hit an illegal instruction on H100 / 0.8).
    for alg in range(min(cslt.max_alg_id(x, comp, n), 3) + 1):
        check_close(cslt.linear(x, comp, n, None, cslt.CsltConfig(alg)), x, p, None)


@pytest.mark.cuda
@needs_cslt
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", list(cslt.LAYOUTS))
def test_cusparselt_every_layout_matches_reference(layout, dtype):
    # Each layout describes the same memory differently: a weight compressed for it gives the same product.
    n, k = 256, 512
    w = random_24_weight(n, k, dtype, "cuda")
    comp = cslt.compress(w, layout)
    b = torch.randn(n, device="cuda", dtype=dtype)
    for m in (1, 48, 300):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        check_close(cslt.linear(x, comp, n, b, cslt.DEFAULT_CONFIG, layout), x, pack_24(w), b)


def test_cusparselt_rejects_unknown_layout():
    with pytest.raises(ValueError, match="layout must be one of"):
        cslt.compress(torch.zeros(64, 64), 8)


@pytest.mark.cuda
@needs_cslt
def test_cusparselt_search_by_timing():
    from llmprune_kernels.sparse24.tuning import time_ms

    w = random_24_weight(512, 1024, torch.float16, "cuda")
    x = torch.randn(256, 1024, device="cuda", dtype=torch.float16)
    cfg, best, times = cslt.search(x, [cslt.compress(w)], 512, lambda fns: time_ms(fns, reps=5), max_algs=4)
    assert times and best == min(times.values()) and cfg.alg_id in times


@pytest.mark.cuda
@needs_cslt
def test_cusparselt_plan_cached_and_graph_capturable():
    n, k, m = 512, 1024, 128
    w = random_24_weight(n, k, torch.float16, "cuda")
    comp = cslt.compress(w)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    y0 = cslt.linear(x, comp, n)
    before = cslt.plan_count()
    for _ in range(3):
        cslt.linear(x, comp, n)
    assert cslt.plan_count() == before  # eager calls after the first create no plan
    w2 = random_24_weight(n, k, torch.float16, "cuda")  # another weight of the same shape shares it
    cslt.linear(x, cslt.compress(w2), n)
    assert cslt.plan_count() == before
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = cslt.linear(x, comp, n)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, y0)
    check_close(y, x, pack_24(w), None)


@pytest.mark.cuda
@needs_cslt
def test_cusparselt_rejects_bad_shapes():
    w = random_24_weight(40, 64, torch.float16, "cuda")
    with pytest.raises(ValueError, match="out_features % 32 == 0"):
        cslt.compress(w)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        cslt.compress(random_24_weight(64, 64, torch.float32, "cuda"))
    assert torch.equal(unpack_24(pack_24(w)), w)
