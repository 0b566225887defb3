"""Triton activation-norm statistics: Wanda's running mean of squared input-channel L2 norms.

``act_norm_update_(stats, x)`` is a drop-in for ``ActNormStats.add_batch``: x is (batch, seq, in) or
(tokens, in) in any float dtype, each leading batch entry counts as one calibration sequence, and

    scaler_row <- scaler_row * n / (n + b) + sum_tokens(x.float() ** 2) / (n + b),    n <- n + b

with fp32 accumulation, in one launch: each program streams all tokens of a block of columns and applies
the running-mean update itself, so the result is deterministic. It equals the reference within fp32
rounding (the reference squares a ``vector_norm``; the summation order differs).

``sq_norm_sum_(acc, x)`` is the raw-sum form the pipeline's statistics use (``methods.statistics``):
``acc += sum_tokens(x.float() ** 2)``, the same kernel with no rescale; one division by the sequence count
at the end gives the running mean, and raw sums of several processes add up by a plain all-reduce.
"""
from __future__ import annotations

import torch

from llmprune_kernels.ops.score_mask import HAS_TRITON, triton_usable
from llmprune_kernels.reference.wanda import ActNormStats
from llmprune_kernels.validation import calibration_batch, check_finite

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


def _launch(x2: torch.Tensor, old: torch.Tensor, new: torch.Tensor, decay: float, divisor: float,
            config=None) -> None:
    """new = old * decay + sum_tokens(x2.float() ** 2) / divisor, one program per column block."""
    n_cols = old.shape[0]
    bt, bc, warps = config or _launch_config(x2.device, n_cols)
    _act_norm_kernel[(triton.cdiv(n_cols, bc),)](
        x2, old, new, x2.shape[0], n_cols, x2.stride(0), decay, divisor,
        BT=bt, BC=bc, num_warps=warps, enable_fp_fusion=False,
    )


def _rows(inp: torch.Tensor, in_features: int) -> torch.Tensor:
    x2 = inp.detach().reshape(-1, in_features)
    return x2 if x2.stride(1) == 1 else x2.contiguous()


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
    n_new = stats.nsamples + batch
    new = torch.empty_like(stats.scaler_row)
    _launch(_rows(inp, stats.in_features), stats.scaler_row, new, stats.nsamples / n_new, float(n_new), _config)
    if check and not bool(torch.isfinite(new).all()):
        check_finite(inp, name)  # raises the reference's message when the input holds NaN/Inf
    stats.scaler_row = new
    stats.nsamples = n_new


@torch.no_grad()
def sq_norm_sum_reference(acc: torch.Tensor, inp: torch.Tensor, name: str = "activations",
                          check: bool = True) -> int:
    """``acc += ||x_j||_2^2`` per input column j (fp32, the reference's squared ``vector_norm``), in place.

    The raw-sum form of ``ActNormStats.add_batch``: dividing the sum by the sequence count once gives the
    running mean. Returns the batch's sequence count. ``check=False``: NaN/Inf are not looked for (they make
    the sums non-finite, which the caller checks once).
    """
    if check:
        x, batch = calibration_batch(inp, acc.shape[0], name)
    else:
        x, batch = inp.reshape(-1, acc.shape[0]), (inp.shape[0] if inp.dim() == 3 else 1)
    acc += torch.linalg.vector_norm(x.float(), ord=2, dim=0) ** 2
    return batch


@torch.no_grad()
def sq_norm_sum_(acc: torch.Tensor, inp: torch.Tensor, name: str = "activations", triton: bool = True,
                 _config=None, check: bool = True) -> int:
    """``sq_norm_sum_reference`` in one Triton launch where usable (``triton``), fp32 accumulation from any
    float dtype; equal to the reference within fp32 rounding (rtol 2e-6, python_tests/test_statistics.py).

    The kernel reads fp16/bf16 activations directly (no fp32 copy of x). NaN/Inf inputs raise like the
    reference; the check looks at the updated sums (one device sync instead of a pass over x). ``check=False``
    skips it (no sync; the caller checks the accumulated sums once, which stay non-finite).
    """
    if inp.shape[-1] != acc.shape[0]:
        raise ValueError(f"{name} have width {inp.shape[-1]}, expected in_features={acc.shape[0]}")
    if not (triton and triton_usable(inp.device)) or inp.numel() == 0 or not inp.is_floating_point():
        return sq_norm_sum_reference(acc, inp, name, check)
    new = torch.empty_like(acc)
    _launch(_rows(inp, acc.shape[0]), acc, new, 1.0, 1.0, _config)
    if check and not bool(torch.isfinite(new).all()):
        check_finite(inp, name)
    acc.copy_(new)
    return inp.shape[0] if inp.dim() == 3 else 1


class TritonActNormStats(ActNormStats):
    """``ActNormStats`` whose ``add_batch`` runs the Triton kernels (reference fallback on unusable devices)."""

    def add_batch(self, inp: torch.Tensor, name: str = "activations") -> None:
        act_norm_update_(self, inp, name=name)
