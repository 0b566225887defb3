"""2:4 packing: exact round trip, the layout on a hand example, validation errors, torch semi-structured."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmprune_kernels.testing import random_24_weight
from llmprune_kernels.sparse24.pack import Packed24, check_24, mask_24, pack_24, to_torch_semi_structured, unpack_24

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 16), (5, 12), (33, 76), (64, 576)])
def test_round_trip_bit_exact(dtype, shape, device):
    w = random_24_weight(*shape, dtype, device)
    p = pack_24(w)
    assert p.values.shape == (shape[0], shape[1] // 2) and p.values.dtype == dtype
    assert p.meta.dtype == torch.uint8 and p.meta.shape == (shape[0], (shape[1] // 4 + 1) // 2)
    assert torch.equal(bits(unpack_24(p)), bits(w))
    # The mask of the packing is the weight's zero pattern here (random weights have no exact zeros).
    assert torch.equal(mask_24(p), w == 0)


def test_hand_example():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]])
    p = pack_24(w)
    assert p.values.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    # group 0 keeps columns (1, 3): nibble 1 | 3 << 2 = 13; group 1 keeps (0, 3): 0 | 3 << 2 = 12.
    assert p.meta.tolist() == [[13 | (12 << 4)]]


def test_sparse_groups_signed_zeros_and_specials_round_trip():
    w = torch.tensor([
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0],
        [-0.0, 0.0, 7.0, 0.0, -0.0, -0.0, 0.0, 0.0],
        [float("nan"), 0.0, 0.0, float("-inf"), 0.0, 1e-30, 0.0, -2.0],
    ], dtype=torch.float32)
    out = unpack_24(pack_24(w))
    assert torch.equal(bits(out), bits(w))  # -0.0 and NaN bit patterns survive


@pytest.mark.parametrize("dtype", DTYPES)
def test_more_than_two_nonzeros_names_row_and_group(dtype):
    w = random_24_weight(6, 16, dtype, "cpu")
    w[2, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=dtype)
    w[4, 0:4] = 1.0
    with pytest.raises(ValueError, match=r"row 2, group 1 \(input columns 4\.\.7\).*3 nonzeros.*2 groups break it"):
        pack_24(w)


@pytest.mark.parametrize("bad, err, match", [
    (torch.zeros(4, 6), ValueError, "multiple of 4, got 6"),
    (torch.zeros(2, 3, 4), ValueError, "must be 2-D"),
    (torch.zeros(4, 8, dtype=torch.int32), TypeError, "dtype torch.int32"),
])
def test_bad_inputs(bad, err, match):
    with pytest.raises(err, match=match):
        check_24(bad)


def test_unpack_rejects_wrong_shapes_and_corrupt_meta():
    p = pack_24(random_24_weight(4, 16, torch.float32, "cpu"))
    with pytest.raises(ValueError, match="values have shape"):
        unpack_24(Packed24(p.values[:, :6], p.meta, p.shape))
    with pytest.raises(ValueError, match="meta has shape"):
        unpack_24(Packed24(p.values, p.meta.to(torch.int16), p.shape))
    meta = p.meta.clone()
    meta[3, 1] = 0x0F  # group 2 -> kept (3, 3), group 3 -> kept (0, 0): neither increasing
    with pytest.raises(ValueError, match="corrupt 2:4 metadata at row 3, group 2"):
        unpack_24(Packed24(p.values, meta, p.shape))


def test_packed_to_keeps_meta_uint8():
    p = pack_24(random_24_weight(4, 16, torch.float32, "cpu")).to(torch.float16)
    assert p.values.dtype == torch.float16 and p.meta.dtype == torch.uint8
    assert p.nbytes() == 4 * 8 * 2 + 4 * 2


def test_torch_semi_structured_from_our_packing_cpu():
    w = random_24_weight(64, 128, torch.float16, "cpu")
    t = to_torch_semi_structured(pack_24(w))
    assert isinstance(t, torch.sparse.SparseSemiStructuredTensor)
    assert torch.equal(t.to_dense(), w)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_semi_structured_matmul_cuda(dtype):
    w = random_24_weight(256, 512, dtype, "cuda")
    t = to_torch_semi_structured(pack_24(w))
    assert isinstance(t, torch.sparse.SparseSemiStructuredTensor)
    x = torch.randn(64, 512, device="cuda", dtype=dtype)
    ref = F.linear(x.float(), w.float())
    got = F.linear(x, t).float()
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
