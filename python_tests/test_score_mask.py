"""Fused Triton score-and-mask against the reference: masks must be equal bit for bit.

On CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), which costs a
fraction of a second per row: these cases use a few rows. Full LLaMA widths run on CUDA.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from llmprune_kernels import SparsityConfig, get_method
from llmprune_kernels.methods.wanda import resolve_backend
from llmprune_kernels.ops import score_mask as sm
from llmprune_kernels.ops.score_mask import pack_mask_bits, score_and_mask, triton_usable, unpack_mask_bits
from llmprune_kernels.reference.gblm import gblm_score
from llmprune_kernels.reference.ria import ria_score
from llmprune_kernels.reference.wanda import mask_from_score, wanda_score

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_usable(DEV), reason="Triton is not usable here")


def quantized(rows, cols, levels=16, dtype=torch.float16, device=DEV):
    """Dequantized-4-bit-like weights: few distinct magnitudes, so rows are full of ties."""
    q = torch.randint(-levels // 2, levels // 2, (rows, cols), device=device).float()
    return (q * 0.0123).to(dtype)


def reference_mask(w, norm, cfg, grad=None, ria=False):
    """The reference's mask for the score ``score_and_mask`` computes (GBLM with ``grad``, RIA, else Wanda)."""
    if grad is not None:
        score = gblm_score(w, norm, grad)
    elif ria:
        score = ria_score(w, norm)
    else:
        score = wanda_score(w, norm)
    return mask_from_score(score, cfg)


def check(w, norm, cfg, grad=None, ria=False, **tune):
    """Kernel mask == reference mask, and the mask prunes exactly k per row / n per group."""
    ref = reference_mask(w, norm, cfg, grad, ria)
    got = score_and_mask(w, norm, cfg, grad=grad, ria=ria, _tune=tune or None)
    if not torch.equal(got, ref):
        bad = (got != ref).nonzero()[:8].tolist()
        raise AssertionError(f"{(got != ref).sum()} mask entries differ, first (row, col): {bad}")
    if cfg.is_nm:
        assert (got.view(w.shape[0], -1, cfg.m).sum(-1) == cfg.n).all()
    else:
        assert (got.sum(1) == math.floor(w.shape[1] * cfg.sparsity)).all()
    return got


@pytest.mark.parametrize("cols", [13, 576, 1536])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_wanda_unstructured_equals_reference(cols, dtype, sparsity):
    w = torch.randn(2, cols, device=DEV).to(dtype)
    check(w, torch.rand(cols, device=DEV) * 3, SparsityConfig(sparsity))


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (4, 8), (1, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_wanda_nm_equals_reference(n, m, dtype):
    cols = 96 * m
    w = torch.randn(6, cols, device=DEV).to(dtype)
    check(w, torch.rand(cols, device=DEV), SparsityConfig(n=n, m=m))


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.75])
def test_rows_full_of_ties(sparsity):
    # equal norms: every score is one of 16 magnitudes; and norms with only 3 distinct values
    w = quantized(3, 576)
    check(w, torch.ones(576, device=DEV), SparsityConfig(sparsity))
    check(w, torch.randint(1, 4, (576,), device=DEV).float(), SparsityConfig(sparsity))
    check(w, torch.ones(576, device=DEV), SparsityConfig(n=2, m=4))


def test_degenerate_rows_and_k_extremes():
    cols = 13
    w = torch.randn(4, cols, device=DEV)
    w[1] = 0  # all-zero row: all ties, lowest columns pruned
    w[2] = 0.5  # constant row
    w[3, ::2] = -0.0  # signed zeros tie with +0.0 as in torch.sort
    norm = torch.rand(cols, device=DEV)
    norm[5] = 0.0
    for s in [0.0, 1 / cols, 0.5, (cols - 1) / cols + 1e-3]:  # k = 0, 1, 6, cols - 1
        check(w, norm, SparsityConfig(s))
    check(torch.zeros(3, 64, device=DEV), torch.zeros(64, device=DEV), SparsityConfig(n=2, m=4))


def test_special_values_nan_inf_subnormal():
    """NaN sorts last (as torch.sort), +inf before it; rows with them or with subnormal scores take the
    integer-compare path, the others the fp32-compare path; both must give the reference mask."""
    w = torch.randn(4, 40, device=DEV)
    w[0, [3, 7, 30]] = float("nan")
    w[1, [2, 9]] = float("inf")
    w[2, ::3] = 1e-40  # subnormal weights -> subnormal scores
    w[3, ::2] = 0.0
    norm = torch.rand(40, device=DEV)
    for s in [0.5, 0.95]:
        check(w, norm, SparsityConfig(s))
        check(w, norm, SparsityConfig(s), float=False, select="radix1")
    check(w, norm, SparsityConfig(n=2, m=4))


@pytest.mark.parametrize("cols", [600])
def test_long_row_paths(cols):
    """Chunked streaming (rows longer than one block) and the full-row fallback of the low-bit search."""
    w = torch.randn(2, cols, device=DEV).half()
    norm = torch.rand(cols, device=DEV)
    check(w, norm, SparsityConfig(0.5), max_block=256, chunk=256)
    check(quantized(2, cols), torch.ones(cols, device=DEV), SparsityConfig(0.4), max_block=256, chunk=256, cap=16)
    check(quantized(2, cols), torch.ones(cols, device=DEV), SparsityConfig(0.6), cap=16, select="radix1")


@pytest.mark.parametrize("tune", [
    dict(rows_per_prog=4, warps_per_row=2, cap=8, pair=False, select="radix1"),
    dict(rows_per_prog=1, float=False, digit=1, pair=False, select="radix1"),
    dict(rows_per_prog=2, float=False, select="radix1"),
    dict(cap=32, digit=2, select="radix1"),
    dict(digit=2, pair=False, float=False, select="radix1"),
])
def test_launch_variants(tune):
    """Search variants (1- or 2-bit steps, pairwise or searched bucket, int or fp32 compares), rows per
    program that do not divide the row count, tiny bucket buffers that overflow into the full-row path."""
    w = torch.randn(3, 300, device=DEV).half()
    check(w, torch.rand(300, device=DEV), SparsityConfig(0.45), **tune)
    check(quantized(3, 300, levels=4), torch.ones(300, device=DEV), SparsityConfig(0.45), **tune)


def check_modes_and_outputs(**tune):
    """GBLM and RIA scores, then the bool mask, packed bits and W zeroed in place from one call."""
    wh = torch.randn(3, 99, device=DEV).half()
    nh = torch.rand(99, device=DEV)
    check(wh, nh, SparsityConfig(0.5), grad=torch.rand_like(wh) * 0.1, **tune)
    check(wh, nh, SparsityConfig(0.5), ria=True, **tune)
    ref = mask_from_score(wanda_score(wh, nh), SparsityConfig(0.3))
    w2 = wh.clone()
    mask, bits = score_and_mask(w2, nh, SparsityConfig(0.3), inplace=True, packed=True, _tune=tune)
    assert torch.equal(mask, ref) and torch.equal(bits, pack_mask_bits(ref))
    assert torch.equal(w2, wh.masked_fill(ref, 0))


def paired(rows, cols, dtype=torch.float32, device=DEV, spread=True):
    """Rows where every value appears exactly twice, in random column order: with equal norms every score
    is tied with its copy. spread=False: all values within a few ulps of 1.0 (one 16-bit key bucket)."""
    half = cols // 2
    if spread:
        v = torch.randn(rows, half, device=device).abs()
    else:
        v = 1.0 + torch.arange(half, device=device).double().repeat(rows, 1) * 2**-23
    v = v.repeat(1, 2)
    perm = torch.argsort(torch.rand(rows, v.shape[1], device=device), dim=1)
    return torch.gather(v, 1, perm).to(dtype)


def test_chunked_low_bits_full_row_fallback():
    """Streamed rows whose 16-bit key bucket overflows the buffer and holds ties: count(< t) must follow every
    accepted low-bit step (it once kept the count of the last step only and pruned too many ties)."""
    cols = 300
    w = paired(1, cols, spread=False)
    for k in [5, 101, 201, 298]:  # 5, 101, 201 failed before the fix
        check(w, torch.ones(cols, device=DEV), SparsityConfig(k / cols + 1e-6), max_block=128, chunk=128, cap=16)


def test_unknown_select_errors():
    w = torch.randn(2, 16, device=DEV)
    with pytest.raises(ValueError, match="select='hist8'; allowed: 'radix1', 'hist'"):
        score_and_mask(w, torch.rand(16, device=DEV), SparsityConfig(0.5), _tune={"select": "hist8"})


@pytest.mark.parametrize("gdtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", [SparsityConfig(0.5), SparsityConfig(n=2, m=4)])
def test_gblm_equals_reference(gdtype, pattern):
    w = torch.randn(3, 256, device=DEV).half()
    g = torch.rand(3, 256, device=DEV).to(gdtype) * 0.1
    check(w, torch.rand(256, device=DEV), pattern, grad=g)


def test_gblm_with_zero_gradient_is_wanda():
    w = torch.randn(3, 128, device=DEV).half()
    norm = torch.rand(128, device=DEV)
    got = score_and_mask(w, norm, SparsityConfig(0.5), grad=torch.zeros_like(w))
    assert torch.equal(got, score_and_mask(w, norm, SparsityConfig(0.5)))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # 0/0 in the interpreter
@pytest.mark.parametrize("pattern", [SparsityConfig(0.5), SparsityConfig(n=4, m=8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_ria_equals_reference(pattern, dtype):
    w = torch.randn(4, 256, device=DEV).to(dtype)
    w[:, 5] = 0  # an all-zero column: 0/0 scores are NaN in both and sort last
    check(w, torch.rand(256, device=DEV), pattern, ria=True)


@pytest.mark.parametrize("pattern", [SparsityConfig(0.3), SparsityConfig(n=2, m=4), SparsityConfig(n=1, m=3)])
def test_inplace_and_packed_bits(pattern):
    cols = 99 if not pattern.is_nm else 24 * pattern.m
    w = torch.randn(3, cols, device=DEV).bfloat16()
    norm = torch.rand(cols, device=DEV)
    ref_mask = mask_from_score(wanda_score(w, norm), pattern)
    mask, bits = score_and_mask(w, norm, pattern, packed=True)
    assert torch.equal(mask, ref_mask)
    assert bits.shape == (3, (cols + 7) // 8) and torch.equal(bits, pack_mask_bits(ref_mask))
    assert torch.equal(unpack_mask_bits(bits, cols), ref_mask)
    w2 = w.clone()
    none, bits_only = score_and_mask(w2, norm, pattern, inplace=True, mask=False, packed=True)
    assert none is None and torch.equal(bits_only, bits)
    assert torch.equal(w2, w.masked_fill(ref_mask, 0))
    wt = w.t().contiguous().t()  # non-contiguous rows: zeroed through a copy
    score_and_mask(wt, norm, pattern, inplace=True, mask=False)
    assert torch.equal(wt, w.masked_fill(ref_mask, 0))


@settings(max_examples=8, deadline=None)
@given(
    rows=st.integers(1, 3),
    cols=st.integers(1, 300),
    sparsity=st.floats(0.0, 0.95),
    dtype=st.sampled_from(DTYPES),
    levels=st.sampled_from([0, 4, 16]),
)
def test_random_shapes(rows, cols, sparsity, dtype, levels):
    w = torch.randn(rows, cols, device=DEV).to(dtype) if levels == 0 else quantized(rows, cols, levels, dtype)
    check(w, torch.rand(cols, device=DEV), SparsityConfig(sparsity))


def test_bad_input_errors():
    w = torch.randn(4, 8, device=DEV)
    with pytest.raises(ValueError, match="activation norms have shape"):
        score_and_mask(w, torch.rand(7, device=DEV), SparsityConfig(0.5))
    with pytest.raises(ValueError, match="multiple of 3"):
        score_and_mask(w, torch.rand(8, device=DEV), SparsityConfig(n=1, m=3))
    with pytest.raises(ValueError, match="NaN"):
        score_and_mask(w, torch.full((8,), float("nan"), device=DEV), SparsityConfig(0.5))
    with pytest.raises(ValueError, match="gradient norms have shape"):
        score_and_mask(w, torch.rand(8, device=DEV), SparsityConfig(0.5), grad=torch.rand(4, 7, device=DEV))
    with pytest.raises(TypeError, match="dtype"):
        score_and_mask(w.int(), torch.rand(8, device=DEV), SparsityConfig(0.5))
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        resolve_backend("fast", "cpu")
    assert resolve_backend("auto", "cpu") == "reference"


@pytest.mark.parametrize("mode", ["wanda", "gblm", "ria"])
@pytest.mark.parametrize("pattern", [SparsityConfig(0.5), SparsityConfig(n=2, m=4)], ids=["unstructured", "2:4"])
def test_reference_fallback_without_triton(monkeypatch, mode, pattern):
    """Where Triton cannot run (here: flagged off, as without Triton or TRITON_INTERPRET=1), score_and_mask
    computes the reference's outputs on CPU, no kernel launched: the bool mask, packed bits, W zeroed in place
    (also through a non-contiguous view), and the same input checks."""
    monkeypatch.setattr(sm, "HAS_TRITON", False)
    monkeypatch.setattr(sm, "INTERPRET", False)

    def no_kernel(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched")

    monkeypatch.setattr(sm, "_launch_rows", no_kernel)
    monkeypatch.setattr(sm, "_launch_nm", no_kernel)
    assert not sm.triton_usable("cpu")
    cols = 100  # not whole bytes: the last byte of the packed bits is padded
    w = torch.randn(5, cols).half()
    w[1] = quantized(1, cols, levels=4, device="cpu")[0]  # ties
    w[2] = 0
    norm = torch.rand(cols)
    grad = torch.rand(5, cols).half() * 0.1 if mode == "gblm" else None
    ria = mode == "ria"
    ref = reference_mask(w, norm, pattern, grad, ria)
    assert torch.equal(score_and_mask(w, norm, pattern, grad=grad, ria=ria), ref)
    w2 = w.clone()
    mask, bits = score_and_mask(w2, norm, pattern, grad=grad, ria=ria, inplace=True, packed=True)
    assert torch.equal(mask, ref) and torch.equal(bits, pack_mask_bits(ref))
    assert bits.shape == (5, (cols + 7) // 8) and torch.equal(unpack_mask_bits(bits, cols), ref)
    assert torch.equal(w2, w.masked_fill(ref, 0))
    none, bits_only = score_and_mask(w.clone(), norm, pattern, grad=grad, ria=ria, mask=False, packed=True)
    assert none is None and torch.equal(bits_only, bits)
    wt = w.t().contiguous().t()  # non-contiguous rows
    assert score_and_mask(wt, norm, pattern, grad=grad, ria=ria, inplace=True, mask=False) is None
    assert torch.equal(wt, w.masked_fill(ref, 0))
    with pytest.raises(ValueError, match="NaN"):
        score_and_mask(w, torch.full((cols,), float("nan")), pattern, grad=grad, ria=ria)


def test_wanda_method_triton_backend_equals_reference():
    torch.manual_seed(1)
    lin = nn.Linear(96, 5, bias=False, device=DEV)
    weights = {}
    for backend in ["reference", "triton"]:
        layer = nn.Linear(96, 5, bias=False, device=DEV)
        layer.weight.data.copy_(lin.weight.data)
        pruner = get_method("wanda")(layer, SparsityConfig(0.5), backend=backend)
        torch.manual_seed(2)
        for _ in range(3):
            pruner.add_batch(torch.randn(2, 7, 96, device=DEV))
        assert pruner.prune()["backend"] == backend
        weights[backend] = layer.weight.data
    # statistics agree to fp32 rounding, so masks may differ only where scores nearly tie: none here
    assert torch.equal(weights["triton"], weights["reference"])


# ----------------------------------------------------------------------------- full sizes on the GPU


@pytest.mark.cuda
@pytest.mark.parametrize("cols", [4096, 11008, 28672])
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_width_unstructured_cuda(cols, dtype):
    w = torch.randn(64, cols, device="cuda").to(dtype)
    w[3] = 0
    norm = torch.rand(cols, device="cuda") * 4
    for s in [0.1, 0.5, 0.7, 0.9]:
        check(w, norm, SparsityConfig(s))
    check(quantized(64, cols, dtype=dtype, device="cuda"), torch.ones(cols, device="cuda"), SparsityConfig(0.5))
    check(quantized(16, cols, dtype=dtype, device="cuda"), norm, SparsityConfig(0.6))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("pattern", [SparsityConfig(0.5), SparsityConfig(n=2, m=4), SparsityConfig(n=4, m=8),
                                     SparsityConfig(n=1, m=4)])
def test_llama7b_shapes_cuda(shape, pattern):
    w = torch.randn(shape, device="cuda").half()
    norm = torch.rand(shape[1], device="cuda")
    mask = check(w, norm, pattern)
    w2 = w.clone()
    score_and_mask(w2, norm, pattern, inplace=True, mask=False)
    assert torch.equal(w2, w.masked_fill(mask, 0))


@pytest.mark.cuda
@pytest.mark.parametrize("tune", [dict(max_block=16384), dict(max_block=4096), dict(cap=32, select="radix1"),
                                  dict(digit=2, select="radix1"), dict(pair=False, select="radix1"),
                                  dict(float=False, select="radix1"), dict(select="radix1")])
def test_tuning_variants_cuda(tune):
    for cols in [4096, 11008, 28672]:
        w = torch.randn(32, cols, device="cuda").half()
        check(w, torch.rand(cols, device="cuda"), SparsityConfig(0.5), **tune)
        check(quantized(32, cols, device="cuda"), torch.ones(cols, device="cuda"), SparsityConfig(0.5), **tune)


@pytest.mark.cuda
@pytest.mark.parametrize("pattern", [SparsityConfig(0.5), SparsityConfig(n=2, m=4)])
def test_gblm_ria_full_size_cuda(pattern):
    w = torch.randn(256, 11008, device="cuda").half()
    norm = torch.rand(11008, device="cuda")
    check(w, norm, pattern, grad=torch.rand_like(w) * 0.05)
    check(w, norm, pattern, ria=True)


@pytest.mark.cuda
def test_chunked_low_bits_full_row_fallback_cuda():
    w = paired(8, 40000, device="cuda", spread=False)  # longer than MAX_BLOCK: the chunked kernel
    for s in [0.3, 0.5]:
        check(w, torch.ones(40000, device="cuda"), SparsityConfig(s), cap=64)
