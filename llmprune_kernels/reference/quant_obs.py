"""8-bit rounding of a pruned weight with the OBS / GPTQ error compensation, over a fixed sparsity mask.

Round-to-nearest FP8 e4m3 (3 mantissa bits) or INT8 adds an error to every kept weight that nothing corrects.
GPTQ (Frantar et al. 2023) rounds one column at a time and moves each column's rounding error onto the later
columns through the inverse-Hessian Cholesky factor ``U`` (upper, ``U^T U = (H + damp I)^-1``), the same update
SparseGPT uses for pruning. Here it runs after SparseGPT over the mask SparseGPT chose, with its Hessian:

* column ``i``: ``q_i = grid(w_i / s) * s`` where kept, ``0`` where pruned (pruned entries stay exactly zero;
  the updates they received from earlier columns are propagated as error like any rounding error);
* ``err = (w_i - q_i) / U[i, i]``; ``W[:, i+1:] -= err ⊗ U[i, i+1:]``, blocked as SparseGPT does (exact update
  inside a block of ``blocksize`` columns, one GEMM for the later columns after it).

Scales are per output row, from the pruned weight, by the rule of ``sparse24.quant8.quantize_24``: ``s = amax /
QMAX`` (448 FP8, 127 INT8), rounded up where the division rounded down, 1 for an all-zero row. So that
``quantize_24`` of the result (which recomputes ``s`` from the row's largest |w|) gives back exactly these 8-bit
values, the kept entry of each row that attains ``amax`` is rounded to ``±QMAX`` whatever its updated value
(its error is compensated like any other), and every other value is clamped to ``[-QMAX, QMAX]``: the result's
row maximum is ``QMAX * s``. The mask never changes; a kept weight may still round to the grid's 0.

Computed in fp32 (as SparseGPT) or fp64; the result is ``q * s`` formed in fp32 and cast to the weight's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmprune_kernels.reference.sparsegpt import damped_inverse_factor
from llmprune_kernels.sparse24.quant8 import QMAX, _next_up, weight_dtype_of

QUANTIZE = ("none", "fp8", "int8")  # the SparseGPT ``quantize`` option's values


@dataclass
class QuantOBSResult:
    weight: torch.Tensor  # q * scale, in the input weight's dtype; exactly 0 where pruned
    codes: torch.Tensor  # the 8-bit values q, in the 8-bit dtype (float8_e4m3fn or int8)
    scale: torch.Tensor  # [out, 1] float32, the per-row scale
    losses: torch.Tensor  # per row: sum over columns of (w - q)^2 / U[i,i]^2 / 2 (SparseGPT's loss form)
    zeros: int  # kept entries whose 8-bit value is 0

    @property
    def loss(self) -> float:
        return float(self.losses.sum())


def row_scales(weight: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    """Per-row scales [out, 1] (fp32) by ``quantize_24``'s per-channel rule: amax / QMAX, never rounded down."""
    amax = weight.detach().float().abs().amax(dim=1, keepdim=True)
    s = amax / QMAX[qdtype]
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s * QMAX[qdtype] < amax, _next_up(s), s)


def to_grid(x: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    """``x`` (already divided by the scale) clamped to ±QMAX and rounded as ``quantize_24`` does (INT8 half to
    even; FP8 e4m3 nearest even, through fp32), in ``x``'s dtype."""
    qmax = QMAX[qdtype]
    if qdtype == torch.int8:
        return x.round().clamp_(-qmax, qmax)
    return x.float().clamp(-qmax, qmax).to(qdtype).to(x.dtype)


def inverse_factor(H: torch.Tensor, damp: float, name: str = "layer") -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1`` after SparseGPT's dead-input rule (``H[i,i] == 0`` -> 1),
    computed as ``reference.sparsegpt.inverse_hessian_factor`` does; ``damp`` is the damping the pruner used."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    U = damped_inverse_factor(H, damp)
    if U is not None:
        return U
    raise RuntimeError(f"{name}: the damped Hessian (damping {damp:g}) is not positive definite; cannot round "
                       f"with error compensation")


def check_inputs(weight: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, blocksize: int, name: str) -> None:
    rows, columns = weight.shape
    if H.device != weight.device or mask.device != weight.device:
        raise ValueError(f"{name}: weight on {weight.device}, Hessian on {H.device}, mask on {mask.device}; "
                         f"allowed: all on one device")
    if H.shape != (columns, columns):
        raise ValueError(f"{name}: Hessian has shape {tuple(H.shape)}, expected ({columns}, {columns})")
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(f"{name}: mask is {list(mask.shape)} {mask.dtype}; expected a bool mask of "
                         f"{list(weight.shape)} (True = pruned)")
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 1:
        raise ValueError(f"{name}: blocksize {blocksize!r} is invalid; allowed: an integer >= 1")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name}: weight contains NaN or Inf values; allowed: finite weights")


@torch.no_grad()
def quantize_obs(weight: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, weight_dtype="fp8", *,
                 damp: float = 0.0, blocksize: int = 128, compute_dtype: torch.dtype = torch.float32,
                 U: torch.Tensor | None = None, name: str = "layer") -> QuantOBSResult:
    """Round the kept entries of the pruned ``weight`` (out, in) to 8 bits with the OBS update (module doc).

    ``H`` (in, in): the calibration Hessian SparseGPT pruned with, ``damp`` the damping it added (its result's
    ``damp``); ``U``, when given, is that factor already computed (``inverse_factor``). ``mask``: bool, True =
    pruned. ``weight_dtype``: ``"fp8"`` or ``"int8"``. Inputs are not modified."""
    qdtype = weight_dtype_of(weight_dtype)
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype {compute_dtype} not allowed (torch.float32, torch.float64)")
    check_inputs(weight, H, mask, blocksize, name)
    rows, columns = weight.shape
    qmax = QMAX[qdtype]
    scale = row_scales(weight.masked_fill(mask, 0), qdtype)
    s = scale.to(compute_dtype)
    # The entry of each row attaining amax (first on ties) is pinned to ±QMAX; rows that are all zero pin nothing.
    W0 = weight.detach().float().masked_fill(mask, 0)
    pin_col = W0.abs().argmax(dim=1)
    pin_val = torch.where(W0.gather(1, pin_col[:, None])[:, 0] < 0, -qmax, qmax).to(compute_dtype)
    pin_col = torch.where(W0.abs().amax(dim=1) > 0, pin_col, -1)
    if U is None:
        U = inverse_factor(H.to(compute_dtype), damp, name)
    U = U.to(compute_dtype)

    W = weight.detach().to(compute_dtype).clone()
    W[:, torch.diag(H) == 0] = 0  # SparseGPT's dead inputs (already zero in its result)
    W.masked_fill_(mask, 0)
    codes = torch.zeros(rows, columns, dtype=compute_dtype, device=W.device)
    losses = torch.zeros(rows, dtype=compute_dtype, device=W.device)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d, col = W1[:, i], U1[i, i], i1 + i
            q = to_grid(w / s[:, 0], qdtype)
            q = torch.where(pin_col == col, pin_val, q).masked_fill_(mask[:, col], 0)
            codes[:, col] = q
            err = (w - q * s[:, 0]) / d
            losses += err**2 / 2
            W1[:, i:] -= torch.outer(err, U1[i, i:])  # exact OBS update inside the block
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)  # lazy update of the later columns, one GEMM

    zeros = int(((codes == 0) & ~mask).sum())
    out = (codes.float() * scale).to(weight.dtype)
    return QuantOBSResult(out, codes.float().to(qdtype), scale, losses, zeros)


@torch.no_grad()
def quantize_nearest(weight: torch.Tensor, mask: torch.Tensor, weight_dtype="fp8") -> torch.Tensor:
    """Round-to-nearest of the kept entries with the same per-row scales (the baseline the OBS rounding
    improves on); ``quantize_24``'s values, as a dense weight in ``weight``'s dtype."""
    qdtype = weight_dtype_of(weight_dtype)
    W = weight.detach().float().masked_fill(mask, 0)
    scale = row_scales(W, qdtype)
    return (to_grid(W / scale, qdtype) * scale).to(weight.dtype)
