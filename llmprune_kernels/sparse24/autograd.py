"""One gradient formula for every frozen 2:4 weight, whatever backend ran the forward.

``y = x @ W.T + b`` with ``W`` a buffer (pruned weights are not trained here): ``dx = dy @ W`` and
``db = sum(dy)``. ``W`` is rebuilt from the packed weight only when a gradient is asked for, so no dense
copy is kept for it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from llmprune_kernels.sparse24.pack import expand_24


def linear_grads(gy: torch.Tensor, weight: Callable[[], torch.Tensor], need_x: bool, need_bias: bool
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx, dbias) of ``y = x @ W.T + b`` for ``gy = dL/dy``; ``weight()`` gives the dense ``W`` when needed."""
    gx = gy @ weight().to(gy.dtype) if need_x else None
    gb = gy.reshape(-1, gy.shape[-1]).sum(0) if need_bias else None
    return gx, gb


def grad_can_flow(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


class Frozen24Linear(torch.autograd.Function):
    """Runs ``fwd(x)`` (any backend's bound call, no autograd of its own) and gives it the frozen-weight
    gradients from the packed ``values`` / ``meta``."""

    @staticmethod
    def forward(ctx, x, bias, fwd, values, meta, in_features):
        ctx.save_for_backward(values, meta)
        ctx.in_features = in_features
        with torch.no_grad():
            return fwd(x)

    @staticmethod
    def backward(ctx, gy):
        values, meta = ctx.saved_tensors
        gx, gb = linear_grads(gy, lambda: expand_24(values, meta, ctx.in_features), ctx.needs_input_grad[0],
                              ctx.needs_input_grad[1])
        return gx, gb, None, None, None, None


def with_frozen_grad(fwd: Callable[[torch.Tensor], torch.Tensor], values: torch.Tensor, meta: torch.Tensor,
                     in_features: int, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fwd`` made differentiable in x and bias (a no-op wrapper when no gradient can flow)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        if grad_can_flow(x, bias):
            return Frozen24Linear.apply(x, bias, fwd, values, meta, in_features)
        return fwd(x)
    return run
