"""Triton activation-norm statistics: Wanda's running mean of squared input-channel L2 norms.

``act_norm_update_(stats, x)`` is a drop-in for ``ActNormStats.add_batch``: x is (batch, seq, in) or
(tokens, in) in any float dtype, each leading batch entry counts as one calibration sequence, and

    scaler_row <- scaler_row * n / (n + b) + sum_tokens(x.float() ** 2) / (n + b),    n <- n + b

with fp32 accumulation, in one launch: each program streams all tokens of a block of columns and applies
the running-mean update itself, so the result is deterministic. It equals the reference within fp32
rounding (the reference squares a ``vector_norm``; the summation order differs).
"""
from __future__ import annotations

import torch

from llmprune_kernels.ops.score_mask import HAS_TRITON, triton_usable
from llmprune_kernels.reference.wanda import ActNormStats
from llmprune_kernels.validation import check_finite

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _act_norm_kernel(x_ptr, old_ptr, new_ptr, n_tok, n_cols, stride_x, decay, n_new,
                         BT: tl.constexpr, BC: tl.constexpr):
        """new[j] = old[j] * decay + (sum_t x[t, j]^2) / n_new for BC columns, streaming all tokens.

        One program per column block, so the token sum and the update need no second pass or atomics and
        the summation order is fixed (deterministic). fp-fusion is off at launch: two roundings, as torch.
        """
        cols = tl.program_id(0) * BC + tl.arange(0, BC)
        cmask = cols < n_cols
        acc = tl.zeros([BT, BC], dtype=tl.float32)
        for t in range(0, n_tok, BT):
            rows = (t + tl.arange(0, BT)).to(tl.int64)
            m = (rows < n_tok)[:, None] & cmask[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
            acc += x * x
        old = tl.load(old_ptr + cols, mask=cmask, other=0.0)
        new = old * decay + tl.math.div_rn(tl.sum(acc, axis=0), n_new)
        tl.store(new_ptr + cols, new, mask=cmask)


_SMS: dict = {}


def _launch_config(device: torch.device, n_cols: int) -> tuple[int, int, int]:
    """(BT, BC, num_warps): about two column blocks per SM, tiles of 8K elements."""
    if device.type == "cuda":
        if device not in _SMS:
            _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
        sms = _SMS[device]
    else:
        sms = 1  # interpreter: fewer, larger programs are faster
    bc = 16
    while bc < 128 and n_cols // (bc * 2) >= 2 * sms:
        bc *= 2
    if device.type != "cuda":
        bc = 256
    return 8192 // bc, bc, 8


@torch.no_grad()
def act_norm_update_(
    stats: ActNormStats, inp: torch.Tensor, name: str = "activations", check: bool = True, _config=None
) -> None:
    """``stats.add_batch(inp)`` through the Triton kernels (same semantics and errors).

    ``check=True`` raises on NaN/Inf inputs like the reference; it looks at the updated norms (a
    non-finite input makes them non-finite), which costs one device sync instead of a pass over x.
    """
    if inp.shape[-1] != stats.in_features:
        raise ValueError(f"{name} have width {inp.shape[-1]}, expected in_features={stats.in_features}")
    if not triton_usable(inp.device) or inp.numel() == 0 or not inp.is_floating_point():
        ActNormStats.add_batch(stats, inp, name=name)
        return
    batch = inp.shape[0] if inp.dim() == 3 else 1
    x2 = inp.detach().reshape(-1, stats.in_features)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    n_new = stats.nsamples + batch
    new = torch.empty_like(stats.scaler_row)
    bt, bc, warps = _config or _launch_config(x2.device, stats.in_features)
    _act_norm_kernel[(triton.cdiv(stats.in_features, bc),)](
        x2, stats.scaler_row, new, x2.shape[0], stats.in_features, x2.stride(0), stats.nsamples / n_new,
        float(n_new), BT=bt, BC=bc, num_warps=warps, enable_fp_fusion=False,
    )
    if check and not bool(torch.isfinite(new).all()):
        check_finite(inp, name)  # raises the reference's message when the input holds NaN/Inf
    stats.scaler_row = new
    stats.nsamples = n_new


class TritonActNormStats(ActNormStats):
    """``ActNormStats`` whose ``add_batch`` runs the Triton kernels (reference fallback on unusable devices)."""

    def add_batch(self, inp: torch.Tensor, name: str = "activations") -> None:
        act_norm_update_(self, inp, name=name)
