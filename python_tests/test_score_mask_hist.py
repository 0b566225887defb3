"""The "hist" unstructured selection (score_mask_hist) against the reference: masks equal bit for bit.

CPU: the Triton interpreter at small widths (a few rows each; it runs ``tl.histogram``). CUDA: LLaMA widths,
compiled, with the PTX shared-memory histogram. Narrow digits (``bits0`` / ``bits`` 1-3) force many
histogram levels and every exit of the select: a bin of one key, of two distinct keys (min or max), of two
equal keys, a bin holding only pruned keys, and a bin one key value wide (ties ranked by column).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmprune_kernels import SparsityConfig
from llmprune_kernels.ops import score_mask as sm
from llmprune_kernels.ops.score_mask import pack_mask_bits, score_and_mask, triton_usable
from llmprune_kernels.reference.wanda import mask_from_score, wanda_score

from test_score_mask import DEV, DTYPES, check, check_modes_and_outputs, paired, quantized

pytestmark = pytest.mark.skipif(not triton_usable(DEV), reason="Triton is not usable here")
HIST = {"select": "hist"}


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


@pytest.mark.parametrize("cols", [13, 576, 1536])
@pytest.mark.parametrize("dtype", DTYPES)
def test_hist_equals_reference(cols, dtype):
    check_mixed_rows(cols, dtype, **HIST)


@pytest.mark.parametrize("bits0,bits", [(1, 1), (2, 3), (3, 2), (5, 1), (8, 10)])
def test_hist_narrow_digits(bits0, bits):
    """Many levels per row; paired rows end in bins of two equal keys, spread=False ones in one 16-bit range."""
    cols = 96
    w = torch.cat([paired(2, cols), paired(1, cols, spread=False), quantized(1, cols, levels=4, dtype=torch.float32),
                   torch.zeros(1, cols, device=DEV), torch.randn(2, cols, device=DEV)])
    ones = torch.ones(cols, device=DEV)
    for k in [0, 1, 2, cols // 2, cols - 2, cols - 1]:
        check(w, ones, SparsityConfig(k / cols + 1e-6), **HIST, bits0=bits0, bits=bits)
    check(w.half(), torch.rand(cols, device=DEV), SparsityConfig(0.3), **HIST, bits0=bits0, bits=bits)


def test_hist_bin_exits():
    """Rows built so that the k-th key ends alone, as the larger or smaller of two, or tied with its pair."""
    base = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0])
    rows = torch.stack([
        base,  # k-th alone in its bin
        torch.tensor([1.0, 1.0 + 2**-20, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),  # two close keys share a bin
        torch.tensor([3.0, 3.0, 1.0, 8.0, 16.0, 32.0, 64.0, 128.0]),  # two equal keys, k between them
        torch.tensor([5.0, 1.0, 5.0, 5.0, 0.0, 5.0, 9.0, 5.0]),  # a run of ties across the k-th
    ]).to(DEV)
    ones = torch.ones(8, device=DEV)
    for k in range(8):
        check(rows, ones, SparsityConfig(k / 8 + 1e-6), **HIST)
        check(rows, ones, SparsityConfig(k / 8 + 1e-6), **HIST, bits0=2, bits=2)


def test_hist_special_values():
    """NaN (sorts last, same key as padding), +inf, subnormal and signed-zero scores."""
    w = special_rows()
    norm = torch.rand(40, device=DEV)
    for s in [0.5, 0.8, 0.95, 39 / 40 + 1e-6]:
        check(w, norm, SparsityConfig(s), **HIST)
        check(w, norm, SparsityConfig(s), **HIST, bits0=3, bits=3)


def test_hist_gblm_ria_and_outputs():
    check_modes_and_outputs(**HIST)


@settings(max_examples=12, deadline=None)
@given(cols=st.integers(1, 200), sparsity=st.floats(0.0, 0.99), dtype=st.sampled_from(DTYPES),
       levels=st.sampled_from([0, 2, 4, 16]), bits0=st.sampled_from([1, 2, 4, 8]), bits=st.sampled_from([1, 3, 10]))
def test_hist_random_rows(cols, sparsity, dtype, levels, bits0, bits):
    w = torch.randn(2, cols, device=DEV).to(dtype) if levels == 0 else quantized(2, cols, levels, dtype)
    check(w, torch.rand(cols, device=DEV), SparsityConfig(sparsity), **HIST, bits0=bits0, bits=bits)


@pytest.mark.parametrize("cols", [96, 600, 3000])
def test_hist_two_piece_rows(cols):
    """Rows held as two power-of-two pieces (96 = 64 + 32, 600 = 512 + 128, 3000 = 2048 + 1024), ties
    straddling the k-th across both pieces included; the same as one padded piece (split=False)."""
    cfg = sm._rows_config(cols, 2, HIST)
    assert cfg["consts"]["B2"] > 0 and cfg["block"] < sm._next_pow2(cols)
    assert sm._rows_config(cols, 2, {**HIST, "split": False})["consts"]["B2"] == 0
    w = rows_mix(cols, torch.float16)
    w[0, -3:] = 1000.0  # the largest keys in the second piece: its max must widen the first level's range
    norm = torch.rand(cols, device=DEV) + 0.5
    for s in [0.0, 0.3, 0.5, (cols - 3) / cols + 1e-4, (cols - 1) / cols + 1e-4]:
        check(w, norm, SparsityConfig(s), **HIST)
    check(quantized(2, cols, levels=4), torch.ones(cols, device=DEV), SparsityConfig(0.5), **HIST)
    check(w, norm, SparsityConfig(0.5), **HIST, split=False)
    wb = w.clone()
    mask, bits = score_and_mask(wb, norm, SparsityConfig(0.4), inplace=True, packed=True, _tune=HIST)
    ref = mask_from_score(wanda_score(w, norm), SparsityConfig(0.4))
    assert torch.equal(mask, ref) and torch.equal(bits, pack_mask_bits(ref)) and torch.equal(wb, w.masked_fill(ref, 0))


def test_hist_selection_and_width_fallback():
    """``select`` picks the hist kernel; rows wider than ``hist_max_block`` stream (chunked, same mask)."""
    assert "hist" in sm.SELECTS
    assert sm._rows_config(4096, 2, HIST)["kernel"] is sm._rows_hist_kernel
    cfg = sm._rows_config(600, 2, {**HIST, "hist_max_block": 512, "max_block": 512})
    assert cfg["chunked"]
    w = torch.randn(2, 600, device=DEV).half()
    check(w, torch.rand(600, device=DEV), SparsityConfig(0.5), **HIST, hist_max_block=512)


# ----------------------------------------------------------------------------- full sizes on the GPU


@pytest.mark.cuda
@pytest.mark.parametrize("cols,dtype", [(4096, torch.float16), (4096, torch.bfloat16), (4096, torch.float32),
                                        (11008, torch.float16), (28672, torch.float16), (28672, torch.bfloat16)])
def test_hist_full_width_cuda(cols, dtype):
    check_full_width(cols, dtype, **HIST)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_hist_llama7b_shapes_cuda(shape):
    check_llama7b_shape(shape, **HIST)


@pytest.mark.cuda
@pytest.mark.parametrize("tune", [dict(elems_per_warp=512), dict(elems_per_warp=2048), dict(bits0=4, bits=4),
                                  dict(bits0=2, bits=2), dict(asm=False), dict(bits=10), dict(bits0=10),
                                  dict(split=False), dict(maxnreg=255), dict(wscan=False, amm=False),
                                  dict(amm=False), dict(wscan=False)],
                         ids=["epw512", "epw2048", "bits4", "bits2", "tl_histogram", "bits10", "bits0_10", "no_split",
                              "no_reg_cap", "block_scan_triton_minmax", "triton_minmax", "block_scan"])
def test_hist_variants_cuda(tune):
    for cols in [4096, 11008]:
        w = torch.randn(32, cols, device="cuda").half()
        check(w, torch.rand(cols, device="cuda"), SparsityConfig(0.5), **HIST, **tune)
        check(quantized(32, cols, device="cuda"), torch.ones(cols, device="cuda"), SparsityConfig(0.5), **HIST,
              **tune)
        check(paired(16, cols, device="cuda"), torch.ones(cols, device="cuda"), SparsityConfig(0.5), **HIST, **tune)


@pytest.mark.cuda
@pytest.mark.parametrize("pattern_sparsity", [0.5, 0.7])
def test_hist_gblm_ria_full_size_cuda(pattern_sparsity):
    w = torch.randn(256, 11008, device="cuda").half()
    norm = torch.rand(11008, device="cuda")
    check(w, norm, SparsityConfig(pattern_sparsity), grad=torch.rand_like(w) * 0.05, **HIST)
    check(w, norm, SparsityConfig(pattern_sparsity), ria=True, **HIST)

