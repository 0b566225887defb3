"""The Triton 2:4 decode kernel and the cuSPARSELt op against the masked dense reference."""
from __future__ import annotations

import os

import pytest
import torch

from llmprune_kernels.ops.sparse24_matmul import sparse24_mm
from llmprune_kernels.reference.sparse24_matmul import sparse24_linear_reference
from llmprune_kernels.sparse24 import cusparselt as cslt
from llmprune_kernels.sparse24.dispatch import random_24_weight
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


# Small sizes: these run under the Triton interpreter on CPU (seconds each).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k, m, bias, block", [
    (48, 128, 1, True, (16, 64, 1)), (20, 76, 3, False, (16, 32, 2)), (64, 64, 17, True, (16, 64, 1)),
    (32, 200, 2, True, (32, 64, 3)),  # split-K with a ragged last slice
])
def test_decode_kernel_small(dtype, n, k, m, bias, block, tdevice):
    device = tdevice
    p = pack_24(random_24_weight(n, k, dtype, device))
    b = torch.randn(n, device=device).to(dtype) if bias else None
    x = torch.randn(2, m, k, device=device).to(dtype)[0]  # a strided-batch view as input
    check_close(sparse24_mm(x, p.values, p.meta, b, k, block=block), x, p, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k, m, block", [
    (48, 136, 1, (16, 8, 1)), (64, 256, 3, (32, 16, 3)), (20, 76, 4, (16, 4, 2)), (32, 200, 2, (32, 16, 1)),
])
def test_gemv_kernel_small(dtype, n, k, m, block, tdevice):
    """The M <= 4 kernel (int32 value pairs, gathered x, split-K partials) against the reference."""
    p = pack_24(random_24_weight(n, k, dtype, tdevice))
    b = torch.randn(n, device=tdevice).to(dtype)
    x = torch.randn(m, k, device=tdevice).to(dtype)
    check_close(sparse24_mm(x, p.values, p.meta, b, k, block=block + (4, 1, 1)), x, p, b)


def test_gemv_kernel_rejects_large_m_and_fp32(tdevice):
    p = pack_24(random_24_weight(32, 64, torch.float16, tdevice))
    with pytest.raises(ValueError, match="M <= 4 and 16-bit"):
        sparse24_mm(torch.randn(5, 64, device=tdevice).half(), p.values, p.meta, None, 64, block=(32, 8, 1, 4, 1, 1))


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


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k", [(4096, 4096), (11008, 4096), (4096, 11008), (576, 1536)])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_decode_kernel_full_size_cuda(dtype, n, k, m):
    p = pack_24(random_24_weight(n, k, dtype, "cuda"))
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    blocks = [(16, 256, 1), (32, 256, 4)] + ([(32, 64, 2, 4, 1, 1)] if m <= 4 else [])  # gemv: M <= 4
    for block in blocks:
        check_close(sparse24_mm(x, p.values, p.meta, None, k, block=block), x, p, None)


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
def test_cusparselt_search_by_timing():
    from llmprune_kernels.sparse24.dispatch import time_ms

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
