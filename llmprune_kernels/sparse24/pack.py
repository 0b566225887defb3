"""2:4 packing: compressed values ``[out, in/2]`` plus 4-bit metadata per group of 4 input columns.

Layout (ours; the Triton decode kernel and the checkpoint format read it directly):

* ``values[r, 2g + j]`` is the j-th kept weight (j = 0, 1, in column order) of group g of row r.
* ``meta[r, g // 2]`` holds group g's nibble, low nibble for even g, high nibble for odd g; the nibble
  is ``i0 | (i1 << 2)`` with ``i0 < i1`` the in-group column indices of the two kept weights.

fp16 / bf16 therefore move 4 + 0.5 bytes per 4 weights instead of 8 (the 1.78x decode limit).
``unpack_24(pack_24(w))`` equals ``w`` in value everywhere, and bit for bit wherever a group of 4 holds at
most two nonzero bit patterns: when a group has fewer than two nonzeros the kept slots prefer nonzero
values, then nonzero bit patterns (``-0.0``), then the lower column index. Two slots cannot hold more: in a
group with more than two nonzero bit patterns (e.g. three ``-0.0``, or a nonzero and two ``-0.0``) the
``-0.0`` beyond the two kept slots come back as ``+0.0``. A weight has 0 or more rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmprune_kernels.validation import check_weight


@dataclass
class Packed24:
    """A 2:4 weight in our compressed layout (see the module docstring)."""

    values: torch.Tensor  # [out, in/2], the weight's dtype
    meta: torch.Tensor  # [out, ceil(in/8)], uint8, two 4-bit groups per byte
    shape: tuple[int, int]  # dense (out, in)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, *args, **kwargs) -> "Packed24":
        """Move / cast like a tensor; the metadata keeps its uint8 dtype."""
        values = self.values.to(*args, **kwargs)
        return Packed24(values, self.meta.to(device=values.device), self.shape)

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel()


def meta_width(in_features: int) -> int:
    """Bytes of metadata per row: one nibble per group of 4 columns."""
    return (in_features // 4 + 1) // 2


def _check_24_shape(shape: tuple[int, ...], name: str = "weight") -> None:
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features), got shape {tuple(shape)}")
    if shape[1] % 4 != 0 or shape[1] == 0:
        raise ValueError(f"2:4 packing needs in_features to be a positive multiple of 4, got {shape[1]}")


def check_24(weight: torch.Tensor) -> None:
    """Raise naming the first row and group (row-major) that holds more than 2 nonzeros of 4."""
    check_weight(weight)
    _check_24_shape(tuple(weight.shape))
    out, inp = weight.shape
    count = (weight.reshape(out, inp // 4, 4) != 0).sum(-1)
    bad = (count > 2).nonzero()
    if bad.numel():
        r, g = (int(v) for v in bad[0])
        vals = weight[r, 4 * g : 4 * g + 4].tolist()
        raise ValueError(
            f"weight is not 2:4 sparse: row {r}, group {g} (input columns {4 * g}..{4 * g + 3}) holds "
            f"{int(count[r, g])} nonzeros {vals}; allowed: at most 2 nonzeros in every group of 4 "
            f"consecutive input columns ({int((count > 2).sum())} groups break it)"
        )


def _bits_nonzero(w: torch.Tensor) -> torch.Tensor:
    itype = {2: torch.int16, 4: torch.int32}[w.element_size()]
    return w.view(itype) != 0


@torch.no_grad()
def pack_24(weight: torch.Tensor) -> Packed24:
    """Compress a 2:4-sparse weight ``[out, in]`` (fp16 / bf16 / fp32, any device, ``out >= 0``) into
    :class:`Packed24`; see the module docstring for which ``-0.0`` survive the round trip."""
    check_24(weight)
    w = weight.detach().contiguous()
    out, inp = w.shape
    g = inp // 4
    w4 = w.reshape(out, g, 4)
    # Priority of each slot: real nonzero (2) > signed zero bit pattern (1) > zero (0); among equal
    # priorities the lower column index is kept, so the choice is deterministic.
    prio = 2 * (w4 != 0).to(torch.int8) + _bits_nonzero(w4).to(torch.int8)
    pos = torch.arange(4, device=w.device, dtype=torch.int8)
    key = prio * 4 + (3 - pos)
    idx = torch.topk(key, 2, dim=-1, sorted=False).indices.sort(dim=-1).values  # [out, g, 2], i0 < i1
    values = torch.gather(w4, 2, idx).reshape(out, inp // 2)
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # [out, g]
    if g % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))
    nib = nib.reshape(out, meta_width(inp), 2)  # explicit sizes: a weight may have 0 rows
    meta = (nib[..., 0] | (nib[..., 1] << 4)).contiguous()
    return Packed24(values.contiguous(), meta, (out, inp))


def meta_indices(meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """Decode the metadata to the kept in-group indices ``[out, in/4, 2]`` (int64)."""
    m = meta.to(torch.int64)
    nib = torch.stack((m & 0xF, m >> 4), dim=-1).reshape(m.shape[0], 2 * m.shape[1])[:, : in_features // 4]
    return torch.stack((nib & 3, nib >> 2), dim=-1)


@torch.no_grad()
def unpack_24(packed: Packed24) -> torch.Tensor:
    """Exact inverse of :func:`pack_24`: the dense ``[out, in]`` weight, zeros where pruned."""
    out, inp = packed.shape
    _check_24_shape((out, inp), "packed shape")
    if tuple(packed.values.shape) != (out, inp // 2):
        raise ValueError(f"values have shape {tuple(packed.values.shape)}; expected {(out, inp // 2)} for {(out, inp)}")
    if packed.meta.dtype != torch.uint8 or tuple(packed.meta.shape) != (out, meta_width(inp)):
        raise ValueError(
            f"meta has shape {tuple(packed.meta.shape)} and dtype {packed.meta.dtype}; "
            f"expected {(out, meta_width(inp))} uint8"
        )
    idx = meta_indices(packed.meta, inp)
    if bool((idx[..., 0] >= idx[..., 1]).any()):
        r, g = (int(v) for v in (idx[..., 0] >= idx[..., 1]).nonzero()[0])
        raise ValueError(f"corrupt 2:4 metadata at row {r}, group {g}: kept indices {idx[r, g].tolist()} are not increasing")
    return expand_24(packed.values, packed.meta, inp)


def expand_24(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """Dense ``[out, in]`` weight from packed values and metadata, unchecked (traceable: autograd, compile)."""
    out = values.shape[0]
    dense = torch.zeros(out, in_features // 4, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(2, meta_indices(meta, in_features), values.reshape(out, in_features // 4, 2))
    return dense.reshape(out, in_features)


def mask_24(packed: Packed24) -> torch.Tensor:
    """Boolean mask of the packing's pruned slots (True = pruned), the project's mask convention."""
    out, inp = packed.shape
    idx = meta_indices(packed.meta, inp)
    kept = torch.zeros(out, inp // 4, 4, dtype=torch.bool, device=packed.meta.device)
    kept.scatter_(2, idx, True)
    return ~kept.reshape(out, inp)


def to_torch_semi_structured(packed: Packed24):
    """A ``torch.sparse.SparseSemiStructuredTensor`` holding the same 2:4 weight.

    On CUDA this picks the cuSPARSELt flavour when torch has it (the only one that runs on sm_90; its
    compressed layout is opaque, so it is rebuilt from the exact dense expansion), else CUTLASS. On the
    CPU, torch's semi-structured tensors cannot run matmuls; the CUTLASS layout (same values, reordered
    metadata) is still built so the conversion itself can be checked.
    """
    import warnings

    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    dense = unpack_24(packed)
    if dense.is_cuda:
        use_cslt = torch.backends.cusparselt.is_available()
        major, _ = torch.cuda.get_device_capability(dense.device)
        if not use_cslt and major >= 9:
            raise RuntimeError(
                "torch has no cuSPARSELt and its CUTLASS 2:4 backend does not run on sm_90+: "
                "no torch semi-structured tensor can run here"
            )
        cls = SparseSemiStructuredTensorCUSPARSELT if use_cslt else SparseSemiStructuredTensorCUTLASS
        return cls.from_dense(dense)
    # CPU: build the CUTLASS layout with torch's own conversion (pure tensor ops).
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    sparse, meta = sparse_semi_structured_from_dense_cutlass(dense)
    with warnings.catch_warnings():  # torch flags the whole API as prototype on every construction
        warnings.simplefilter("ignore", UserWarning)
        return SparseSemiStructuredTensorCUTLASS(
            dense.shape, packed=sparse, meta=meta, packed_t=None, meta_t=None,
            compressed_swizzled_bitmask=None, requires_grad=False,
        )
