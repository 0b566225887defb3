"""The "interp" unstructured selection (score_mask_interp) against the reference: masks equal bit for bit.

CPU: the Triton interpreter at small widths (a few rows each). CUDA: LLaMA widths, compiled.
"""
from __future__ import annotations

import pytest
import torch

from llmprune_kernels import SparsityConfig
from llmprune_kernels.ops import score_mask as sm
from llmprune_kernels.ops.score_mask import pack_mask_bits, score_and_mask, triton_usable

from test_score_mask import DEV, DTYPES, check, check_modes_and_outputs, paired, quantized

pytestmark = pytest.mark.skipif(not triton_usable(DEV), reason="Triton is not usable here")
INTERP = {"select": "interp"}


def rows_mix(cols, dtype, device=DEV):
    """Random, all-zero, quantized (ties), paired (every value twice) and constant rows."""
    w = torch.randn(5, cols, device=device)
    w[1] = 0
    w[2] = quantized(1, cols, levels=4, dtype=torch.float32, device=device)[0]
    w[3] = paired(1, cols, device=device)[0] if cols % 2 == 0 else w[3]
    w[4] = 0.25
    return w.to(dtype)


def check_mixed_rows(cols, dtype, **tune):
    """A select on the mixed rows at k = 0, 10%, 50%, 90% and cols - 1."""
    w = rows_mix(cols, dtype)
    norm = torch.rand(cols, device=DEV) * 3
    for s in [0.0, 0.1, 0.5, 0.9, (cols - 1) / cols + 1e-4]:  # k = 0 ... cols - 1
        check(w, norm, SparsityConfig(s), **tune)


@pytest.mark.parametrize("cols", [13, 576, 1536])
@pytest.mark.parametrize("dtype", DTYPES)
def test_interp_equals_reference(cols, dtype):
    check_mixed_rows(cols, dtype, **INTERP)


@pytest.mark.parametrize("tune", [dict(cap=2), dict(cap=4, float=False), dict(num_warps=1), dict(cap=128)],
                         ids=["cap2", "cap4_int", "warps1", "cap128"])
def test_interp_loop_paths(tune):
    """Tiny buffers force many narrowing passes (interpolation, three-way splits, tightening) down to
    single values; integer compares; one warp; a buffer larger than the row."""
    cols = 96
    w = torch.cat([paired(2, cols), paired(1, cols, spread=False), quantized(1, cols, levels=4, dtype=torch.float32),
                   torch.zeros(1, cols, device=DEV), torch.randn(2, cols, device=DEV)])
    ones = torch.ones(cols, device=DEV)
    for k in [0, 1, cols // 2, cols - 1]:
        check(w, ones, SparsityConfig(k / cols + 1e-6), **INTERP, **tune)
    check(w.half(), torch.rand(cols, device=DEV), SparsityConfig(0.3), **INTERP, **tune)


def special_rows():
    """40-column rows with NaN (sorts last), +inf, subnormal and signed-zero weights, and one row whose k-th
    score at 50% is 0."""
    w = torch.randn(5, 40, device=DEV)
    w[0, [3, 7, 30]] = float("nan")
    w[1, [2, 9]] = float("inf")
    w[2, ::3] = 1e-40
    w[3, ::2] = -0.0
    w[4, :30] = 0.0
    return w


def test_interp_special_values():
    """Special scores: the integer-compare path and the fp32 one (the zero row is decided by the first pass)."""
    w = special_rows()
    norm = torch.rand(40, device=DEV)
    for s in [0.5, 0.8, 0.95]:
        check(w, norm, SparsityConfig(s), **INTERP)
        check(w, norm, SparsityConfig(s), float=False, **INTERP)


def test_interp_gblm_ria_and_outputs():
    check_modes_and_outputs(**INTERP)


def test_interp_selection_and_width_fallback():
    """``select`` picks the interp kernel; rows wider than ``interp_max_block`` keep radix1 (same mask)."""
    assert "interp" in sm.SELECTS
    assert sm._rows_config(4096, 2, INTERP)["kernel"] is sm._rows_interp_kernel
    cfg = sm._rows_config(600, 2, {**INTERP, "interp_max_block": 512})
    assert cfg["kernel"] is sm._rows_kernel
    w = torch.randn(2, 600, device=DEV).half()
    check(w, torch.rand(600, device=DEV), SparsityConfig(0.5), **INTERP, interp_max_block=512)


# ----------------------------------------------------------------------------- full sizes on the GPU


def check_full_width(cols, dtype, **tune):
    """A select on CUDA at a full row width: random rows with an all-zero one at sparsities 0 ... (cols - 1)/cols,
    the mixed rows, dequantized-like rows full of ties, and paired rows."""
    w = torch.randn(48, cols, device="cuda").to(dtype)
    w[3] = 0
    norm = torch.rand(cols, device="cuda") * 4
    for s in [0.0, 0.1, 0.5, 0.9, (cols - 1) / cols + 1e-6]:
        check(w, norm, SparsityConfig(s), **tune)
    check(rows_mix(cols, dtype, device="cuda"), norm, SparsityConfig(0.5), **tune)
    check(quantized(32, cols, dtype=dtype, device="cuda"), torch.ones(cols, device="cuda"), SparsityConfig(0.5),
          **tune)
    check(paired(16, cols, device="cuda").to(dtype), torch.ones(cols, device="cuda"), SparsityConfig(0.6), **tune)


@pytest.mark.cuda
@pytest.mark.parametrize("cols,dtype", [(4096, torch.float16), (4096, torch.bfloat16), (4096, torch.float32),
                                        (11008, torch.float16), (28672, torch.float16)])
def test_interp_full_width_cuda(cols, dtype):  # few (width, dtype) pairs: each is a Triton compile
    check_full_width(cols, dtype, **INTERP)


def check_llama7b_shape(shape, **tune):
    """A select on CUDA at a LLaMA-7B weight shape: the mask, W zeroed in place, and the packed bits."""
    w = torch.randn(shape, device="cuda").half()
    norm = torch.rand(shape[1], device="cuda")
    mask = check(w, norm, SparsityConfig(0.5), **tune)
    w2 = w.clone()
    score_and_mask(w2, norm, SparsityConfig(0.5), inplace=True, mask=False, _tune=tune)
    assert torch.equal(w2, w.masked_fill(mask, 0))
    _, bits = score_and_mask(w, norm, SparsityConfig(0.5), mask=False, packed=True, _tune=tune)
    assert torch.equal(bits, pack_mask_bits(mask))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_interp_llama7b_shapes_cuda(shape):
    check_llama7b_shape(shape, **INTERP)


@pytest.mark.cuda
@pytest.mark.parametrize("tune", [dict(elems_per_warp=2048), dict(cap=8), dict(float=False)],
                         ids=["epw2048", "cap8", "int"])
def test_interp_variants_cuda(tune):
    for cols in [4096, 11008]:
        w = torch.randn(32, cols, device="cuda").half()
        check(w, torch.rand(cols, device="cuda"), SparsityConfig(0.5), **INTERP, **tune)
        check(quantized(32, cols, device="cuda"), torch.ones(cols, device="cuda"), SparsityConfig(0.5), **INTERP,
              **tune)
