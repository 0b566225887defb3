"""``SparseExperts``: a drop-in for a fused mixture-of-experts module whose expert matrices are 2:4-sparse.

transformers 5 keeps an MoE layer's experts as two 3-D parameters (``gate_up_proj`` (E, 2I, H), ``down_proj``
(E, H, I); layout in :mod:`llmprune_kernels.pipeline.experts`). ``SparseExperts`` holds each expert's two
matrices as :class:`~llmprune_kernels.sparse24.linear.SparseLinear` modules (``gate_up[e]``: out 2I, in H;
``down[e]``: out H, in I), so every expert matmul goes through the same 2:4 dispatch as any SparseLinear
(the masked dense matmul on CPU; per M bucket the tuned backend on CUDA, M being the tokens routed to that
expert). Its forward is transformers' eager expert loop with those modules in place of
``F.linear(x, W[e])``::

    for each expert e that received tokens (top_k_index):
        gate, up = gate_up[e](x_e).chunk(2, -1);  y_e = down[e](act(gate) * up) * routing weight
        out[token_idx] += y_e

so on CPU it equals the dense experts' eager forward on the same (pruned) weights. ``sparsify_`` swaps it in
for every fused experts module whose matrices are all 2:4 (``swap_experts``). Its ``state_dict`` holds the
packed ``values`` / ``meta`` of each expert (``gate_up.<e>.values``, ...): save the pruned model dense with
``save_model`` before ``sparsify_``; ``save_compressed`` does not cover experts.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from llmprune_kernels.pipeline.experts import fused_experts, routed_tokens
from llmprune_kernels.sparse24.linear import SparseLinear, _is_24
from llmprune_kernels.sparse24.pack import pack_24

__all__ = ["SparseExperts", "pack_experts", "swap_experts"]


def _default_gating(experts: nn.Module) -> bool:
    """transformers' default ``_apply_gate`` (``act_fn(gate) * up``), the one SparseExperts reproduces."""
    fn = getattr(type(experts), "_apply_gate", None)
    return getattr(fn, "__name__", None) == "_default_apply_gate" and isinstance(getattr(experts, "act_fn", None),
                                                                                 nn.Module)


class SparseExperts(nn.Module):
    """Fused experts with each expert's ``gate_up`` (2I x H) and ``down`` (H x I) matrix as a 2:4 SparseLinear."""

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn: nn.Module,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.gate_up = nn.ModuleList(SparseLinear(hidden_dim, 2 * intermediate_dim, bias=False, device=device,
                                                  dtype=dtype) for _ in range(num_experts))
        self.down = nn.ModuleList(SparseLinear(intermediate_dim, hidden_dim, bias=False, device=device, dtype=dtype)
                                  for _ in range(num_experts))
        self.act_fn = act_fn

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: nn.Module) -> "SparseExperts":
        """Pack a fused experts module (2:4 in every expert matrix: an error names the expert, row and group)."""
        if not fused_experts(experts) or not _default_gating(experts):
            raise ValueError(f"{type(experts).__name__} is not a fused experts module SparseExperts can replace; "
                             f"allowed: gate_up_proj (E, 2I, H) and down_proj (E, H, I), concatenated, not "
                             f"transposed, without biases, gated by act_fn(gate) * up")
        gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()
        e, two_i, h = gu.shape
        mod = cls(e, h, two_i // 2, experts.act_fn, device=gu.device, dtype=gu.dtype)
        for name, weights, targets in (("gate_up_proj", gu, mod.gate_up), ("down_proj", dn, mod.down)):
            for i in range(e):
                try:
                    packed = pack_24(weights[i])
                except ValueError as exc:
                    raise ValueError(f"expert {i} {name}: {exc}") from None
                targets[i].values.copy_(packed.values)
                targets[i].meta.copy_(packed.meta)
        return mod

    def linears(self) -> list[SparseLinear]:
        return [*self.gate_up, *self.down]

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, top_k_pos, token_idx in routed_tokens(top_k_index, self.num_experts):
            h = self._apply_gate(self.gate_up[e](hidden_states[token_idx]))
            y = self.down[e](h) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, 2:4")


def _all_24(experts: nn.Module) -> bool:
    gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()
    return all(_is_24(gu[i]) and _is_24(dn[i]) for i in range(gu.shape[0]))


def pack_experts(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None
                 ) -> list[tuple[str, SparseExperts]]:
    """``(fqn, SparseExperts)`` for each fused experts module to swap, packed, the model not yet changed.

    Default: every fused experts module whose matrices are all 2:4 (others stay dense). ``filter_fn(module,
    fqn)`` picks instead; a picked module that is not 2:4 raises naming it, the expert, row and group.
    """
    out = []
    for fqn, mod in model.named_modules():
        if not fused_experts(mod) or not _default_gating(mod):
            continue
        if filter_fn is None and not _all_24(mod):
            continue
        if filter_fn is not None and not filter_fn(mod, fqn):
            continue
        try:
            out.append((fqn, SparseExperts.from_experts(mod)))
        except ValueError as exc:
            raise ValueError(f"{fqn}: {exc}") from None
    return out


def swap_experts(model: nn.Module, packed: list[tuple[str, SparseExperts]], table=None,
                 dense_tolerance: float = 0.0) -> list[SparseLinear]:
    """Put ``pack_experts``' modules in place; returns their SparseLinears (for tuning and ``prepare``)."""
    new = []
    for fqn, sparse in packed:
        parent_name, _, child = fqn.rpartition(".")
        for sl in sparse.linears():
            sl.table = table
            sl.dense_tolerance = dense_tolerance
            new.append(sl)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, sparse)
    return new
