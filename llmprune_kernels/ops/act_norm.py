"""Triton activation-norm statistics: Wanda's running mean of squared input-channel L2 norms.

``act_norm_update_(stats, x)`` is a drop-in for ``ActNormStats.add_batch``: x is (batch, seq, in) or
(tokens, in) in any float dtype, each leading batch entry counts as one calibration sequence, and

    scaler_row <- scaler_row * n / (n + b) + sum_tokens(x.float() ** 2) / (n + b),    n <- n + b

with fp32 accumulation. Stage 1 splits the tokens across programs (enough to fill the GPU) and writes
fp32 partial sums; stage 2 adds the partials in a fixed order and applies the running-mean update, so
the result is deterministic. It equals the reference within fp32 rounding (the reference squares a
``vector_norm``; the summation order differs).
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
    def _sumsq_partial_kernel(x_ptr, part_ptr, n_tok, n_cols, stride_x, tok_per_split,
                              BT: tl.constexpr, BC: tl.constexpr):
        """partial[s, j] = sum over the tokens of split s of x[t, j]^2 (fp32)."""
        pid_c = tl.program_id(0)
        pid_s = tl.program_id(1)
        cols = pid_c * BC + tl.arange(0, BC)
        cmask = cols < n_cols
        t0 = pid_s * tok_per_split
        t1 = tl.minimum(t0 + tok_per_split, n_tok)
        acc = tl.zeros([BT, BC], dtype=tl.float32)
        for t in range(t0, t1, BT):
            rows = (t + tl.arange(0, BT)).to(tl.int64)
            m = (rows < t1)[:, None] & cmask[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
            acc += x * x
        tl.store(part_ptr + pid_s * n_cols + cols, tl.sum(acc, axis=0), mask=cmask)

    @triton.jit
    def _update_kernel(part_ptr, old_ptr, new_ptr, n_cols, n_split, decay, n_new, BC: tl.constexpr):
        """new = old * decay + sum_s partial[s] / n_new (two roundings, as the reference's two ops)."""
        cols = tl.program_id(0) * BC + tl.arange(0, BC)
        cmask = cols < n_cols
        acc = tl.zeros([BC], dtype=tl.float32)
        for s in range(0, n_split):
            acc += tl.load(part_ptr + s * n_cols + cols, mask=cmask, other=0.0)
        old = tl.load(old_ptr + cols, mask=cmask, other=0.0)
        new = old * decay + tl.math.div_rn(acc, n_new)
        tl.store(new_ptr + cols, new, mask=cmask)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: programs run one after another, fewer is faster


def sum_squares(x2: torch.Tensor, block_tokens: int = 32, block_cols: int = 256) -> torch.Tensor:
    """Per-column partial sums of squares of a (tokens, in) tensor: (splits, in) fp32."""
    n_tok, n_cols = x2.shape
    n_cblk = triton.cdiv(n_cols, block_cols)
    # ~4 programs per SM, each with a whole number of token tiles
    splits = max(1, min(triton.cdiv(4 * _num_sms(x2.device), n_cblk), triton.cdiv(n_tok, block_tokens)))
    per_split = triton.cdiv(triton.cdiv(n_tok, splits), block_tokens) * block_tokens
    splits = max(1, triton.cdiv(n_tok, per_split))
    part = torch.empty(splits, n_cols, dtype=torch.float32, device=x2.device)
    _sumsq_partial_kernel[(n_cblk, splits)](
        x2, part, n_tok, n_cols, x2.stride(0), per_split, BT=block_tokens, BC=block_cols, num_warps=4
    )
    return part


@torch.no_grad()
def act_norm_update_(stats: ActNormStats, inp: torch.Tensor, name: str = "activations", check: bool = True) -> None:
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
    part = sum_squares(x2)
    n_new = stats.nsamples + batch
    new = torch.empty_like(stats.scaler_row)
    block = 256
    _update_kernel[(triton.cdiv(stats.in_features, block),)](
        part, stats.scaler_row, new, stats.in_features, part.shape[0], stats.nsamples / n_new, float(n_new),
        BC=block, num_warps=4, enable_fp_fusion=False,
    )
    if check and not bool(torch.isfinite(new).all()):
        check_finite(inp, name)  # raises the reference's message when the input holds NaN/Inf
    stats.scaler_row = new
    stats.nsamples = n_new


class TritonActNormStats(ActNormStats):
    """``ActNormStats`` whose ``add_batch`` runs the Triton kernels (reference fallback on unusable devices)."""

    def add_batch(self, inp: torch.Tensor, name: str = "activations") -> None:
        act_norm_update_(self, inp, name=name)
