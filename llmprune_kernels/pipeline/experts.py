"""Mixture-of-experts layers: every expert's slice of the fused 3-D expert weights, pruned as its own matrix.

transformers 5 keeps the experts of Mixtral, Qwen2-MoE, Qwen3-MoE (and the other families whose experts class
is decorated with ``use_experts_implementation``) in one ``*Experts`` module holding two 3-D parameters, not
one ``nn.Linear`` per expert. Its eager forward reads them, per expert ``e``, as

* ``gate_up_proj`` (E, 2I, H): ``gate, up = F.linear(x, gate_up_proj[e]).chunk(2, -1)``, so ``gate_up_proj[e]``
  is an (out = 2I, in = H) matrix, rows [0, I) the gate projection and rows [I, 2I) the up projection;
* ``down_proj`` (E, H, I): ``F.linear(act(gate) * up, down_proj[e])``, an (out = H, in = I) matrix.

``ExpertSlice`` presents one such ``[e]`` matrix as an ``nn.Linear`` whose ``weight`` is a view of the 3-D
parameter, re-read on every access (a device move or a streamed load that replaces the parameter is
followed), so every pruner works unchanged: rows are outputs, columns inputs, per-row sparsity and N:M along
the input dimension as for any Linear, and the pruned values land in the 3-D parameter, which is what
``save_pretrained`` writes and plain transformers loads.

Statistics come from the tokens routed to each expert only. While any forward hook is registered on a slice
(the pipeline's statistics pass, the reconstruction-error pass), the experts module's forward first computes
its output with its own forward (whichever ``experts_implementation`` the config selects), then runs the
eager routing loop once more calling the hooked slices, so each hook sees exactly the tokens the router sent
to that expert (``hidden_states[token_idx]`` for ``gate_up_proj[e]``, the gated activations for
``down_proj[e]``). The layer's output is therefore the same, bit for bit, with and without hooks (a resumed
run replays layers without hooks). The module's own forward comes back when the last hook is removed.

The expert rule (``expert_rule``): a method that needs calibration prunes an expert's slices from their
statistics only when the expert received at least ``min_expert_tokens`` calibration tokens (default
``MIN_EXPERT_TOKENS``). An expert below that (never routed to, or too rarely for its statistics to mean
anything) has both slices pruned by per-row magnitude: Wanda's score with equal activation norms, i.e. the
smallest ``|W|`` of every output row (N:M: of every group of M inputs), at the same sparsity, so every row
reaches the target exactly as in its calibrated siblings. Each slice's report line (``LinearStats.extra``)
names its ``expert``, ``expert_tokens`` and ``expert_rule`` (``"calibrated"`` or ``"magnitude"``).

Routers are never pruned: the top-k routers of transformers 5 are no ``nn.Linear``, and ``is_router`` keeps
the Linears an MoE block uses for routing (``gate``, ``router``, Qwen2-MoE's ``shared_expert_gate``) out of
the prunable set. A shared expert (Qwen2-MoE's ``shared_expert``) is a plain MLP of Linears and is pruned
as one.

Supported layout: the concatenated, non-transposed, bias-free, gated experts of transformers' defaults
(``is_concatenated``, not ``is_transposed``, not ``has_bias``, ``has_gate``, no post-expert norm); other
fused experts (e.g. GPT-OSS's, Llama 4's transposed ones) are left dense with one warning per class.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from llmprune_kernels.validation import SparsityConfig

log = logging.getLogger(__name__)

__all__ = ["ExpertSlice", "MIN_EXPERT_TOKENS", "add_cli_arguments", "check_min_expert_tokens", "expert_rule",
           "expert_slices", "fused_experts", "is_router", "routed_tokens"]

# An expert needs this many calibration tokens for its statistics to be used (below it: magnitude).
MIN_EXPERT_TOKENS = 16
PARAMS = ("gate_up_proj", "down_proj")
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
_warned: set[str] = set()


def _is_3d_param(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 3


def fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module of the supported fused layout (see the module docstring)."""
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (_is_3d_param(gu) and _is_3d_param(dn)):
        return False
    layout_ok = (getattr(module, "is_concatenated", True) and not getattr(module, "is_transposed", False)
                 and not getattr(module, "has_bias", False) and getattr(module, "has_gate", True)
                 and not getattr(module, "has_post_expert_norm", False))
    e, two_i, h = gu.shape
    shapes_ok = two_i % 2 == 0 and tuple(dn.shape) == (e, h, two_i // 2) and callable(getattr(module, "_apply_gate", None))
    if layout_ok and shapes_ok:
        return True
    name = type(module).__name__
    if name not in _warned:
        _warned.add(name)
        log.warning("%s: fused experts of an unsupported layout (gate_up_proj %s, down_proj %s, transposed=%s, "
                    "bias=%s); its experts are left dense", name, tuple(gu.shape), tuple(dn.shape),
                    getattr(module, "is_transposed", False), getattr(module, "has_bias", False))
    return False


def is_router(parent: nn.Module, child_name: str, child: nn.Module) -> bool:
    """A Linear an MoE block routes with: named ``gate`` / ``router`` / ``shared_expert_gate`` beside ``experts``."""
    return isinstance(child, nn.Linear) and child_name in ROUTER_NAMES and hasattr(parent, "experts")


class ExpertSlice(nn.Linear):
    """Expert ``index`` of the 3-D parameter ``param`` of ``experts``, as an (out, in) ``nn.Linear`` view.

    ``weight`` is ``getattr(experts, param).detach()[index]``, fetched on each access: writes into it (pruners
    work in place) change the 3-D parameter. ``tokens`` counts the rows this slice received. Registering a
    forward hook routes the experts' tokens through the slices (module docstring) until the hook is removed.
    """

    def __init__(self, experts: nn.Module, param: str, index: int) -> None:
        nn.Module.__init__(self)  # no parameters of its own: the weight belongs to ``experts``
        if param not in PARAMS:
            raise ValueError(f"expert parameter {param!r} is unknown; allowed: {', '.join(PARAMS)}")
        self.__dict__["experts"] = experts  # a plain reference, not a submodule (not in any state_dict)
        self.param, self.index = param, int(index)
        self.out_features, self.in_features = getattr(experts, param).shape[1:]
        self.bias = None
        self.tokens = 0

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return getattr(self.experts, self.param).detach()[self.index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tokens += x.numel() // max(x.shape[-1], 1)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"expert={self.index}, {self.param}: in_features={self.in_features}, out_features={self.out_features}"

    def register_forward_hook(self, hook, *args, **kwargs):
        return _RoutingHandle(self, super().register_forward_hook(hook, *args, **kwargs))

    def register_forward_pre_hook(self, hook, *args, **kwargs):
        return _RoutingHandle(self, super().register_forward_pre_hook(hook, *args, **kwargs))


def expert_slices(experts: nn.Module, prefix: str) -> dict[str, ExpertSlice]:
    """``{"<prefix>.<e>.gate_up_proj": slice, "<prefix>.<e>.down_proj": slice, ...}``, expert by expert."""
    n = getattr(experts, "gate_up_proj").shape[0]
    return {f"{prefix}.{e}.{p}" if prefix else f"{e}.{p}": ExpertSlice(experts, p, e) for e in range(n) for p in PARAMS}


# ---------------------------------------------------------------------------------------------- routing

_STATE = "_llmprune_routing"  # on the experts module while slices are hooked: {(param, e): [slice, refcount]}


class _RoutingHandle:
    """The hook's handle; removing it also releases the routing it turned on."""

    def __init__(self, sl: ExpertSlice, inner: Any) -> None:
        self.slice, self.inner, self.active = sl, inner, True
        _attach(sl)

    def remove(self) -> None:
        self.inner.remove()
        if self.active:
            self.active = False
            _detach(self.slice)

    def __enter__(self) -> "_RoutingHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _attach(sl: ExpertSlice) -> None:
    experts = sl.experts
    state = experts.__dict__.get(_STATE)
    if state is None:
        state = {"slices": {}, "saved_forward": experts.__dict__.get("forward")}
        experts.__dict__[_STATE] = state
        own = state["saved_forward"] or type(experts).forward.__get__(experts)  # e.g. an accelerate hook

        def forward(*args: Any, **kwargs: Any) -> Any:
            out = own(*args, **kwargs)
            _feed_slices(experts, *args, **kwargs)
            return out
        experts.__dict__["forward"] = forward
    entry = state["slices"].setdefault((sl.param, sl.index), [sl, 0])
    if entry[0] is not sl:
        raise RuntimeError(f"{type(experts).__name__}: two views of expert {sl.index}'s {sl.param} are hooked at "
                           "once; hook one ExpertSlice per expert matrix")
    entry[1] += 1


def _detach(sl: ExpertSlice) -> None:
    experts = sl.experts
    state = experts.__dict__.get(_STATE)
    if state is None:
        return
    key = (sl.param, sl.index)
    entry = state["slices"].get(key)
    if entry is not None:
        entry[1] -= 1
        if entry[1] <= 0:
            del state["slices"][key]
    if not state["slices"]:
        del experts.__dict__[_STATE]
        if state["saved_forward"] is None:
            experts.__dict__.pop("forward", None)
        else:
            experts.__dict__["forward"] = state["saved_forward"]


def _routing_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args[:3]) + [kwargs[n] for n in names[len(args):3]]
    return vals[0], vals[1], vals[2]


def routed_tokens(top_k_index: torch.Tensor, num_experts: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(e, top_k_pos, token_idx)`` per expert that got tokens, as transformers' eager loop computes them."""
    mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    out = []
    for e in hit[:, 0].tolist():
        if e == num_experts:  # expert parallelism marks tokens of other ranks' experts with E
            continue
        top_k_pos, token_idx = torch.where(mask[e])
        out.append((e, top_k_pos, token_idx))
    return out


@torch.no_grad()
def _feed_slices(experts: nn.Module, *args: Any, **kwargs: Any) -> None:
    """transformers' eager expert loop, calling the hooked slices (their hooks see the routed tokens)."""
    state = experts.__dict__.get(_STATE)
    if not state or not state["slices"]:
        return
    slices = {k: v[0] for k, v in state["slices"].items()}
    hidden, top_k_index, _ = _routing_args(args, kwargs)
    gate_up = experts.gate_up_proj
    for e, _pos, token_idx in routed_tokens(top_k_index, gate_up.shape[0]):
        gu, dn = slices.get(("gate_up_proj", e)), slices.get(("down_proj", e))
        if gu is None and dn is None:
            continue
        x = hidden[token_idx]
        h = gu(x) if gu is not None else F.linear(x, gate_up[e])
        if dn is not None:
            dn(experts._apply_gate(h))


# ---------------------------------------------------------------------------------------------- the rule


class _Annotated:
    """A pruner whose report line gains the slice's expert fields."""

    def __init__(self, pruner: Any, fields: dict[str, Any]) -> None:
        self.pruner, self.fields = pruner, fields
        self.layer_name = getattr(pruner, "layer_name", "layer")

    def prune(self) -> dict[str, Any]:
        return {**(self.pruner.prune() or {}), **self.fields}

    def free(self) -> None:
        self.pruner.free()

    def __getattr__(self, name: str) -> Any:  # anything else (layer, config, stats, ...) is the method's
        if name == "pruner":
            raise AttributeError(name)
        return getattr(self.pruner, name)


class _RowMagnitude:
    """The expert rule's pruner: the smallest |W| of each row (N:M: of each group), at the slice's target."""

    def __init__(self, layer: nn.Linear, config: SparsityConfig, fields: dict[str, Any]) -> None:
        self.layer, self.config, self.fields = layer, config, fields

    @torch.no_grad()
    def prune(self) -> dict[str, Any]:
        from llmprune_kernels.reference.wanda import mask_from_score
        from llmprune_kernels.validation import check_weight

        w = self.layer.weight
        check_weight(w)
        w.masked_fill_(mask_from_score(w.abs().float(), self.config), 0)
        return dict(self.fields)

    def free(self) -> None:
        pass


def check_min_expert_tokens(value: Any) -> int:
    """``value`` if it is a valid ``min_expert_tokens`` (an integer >= 1), else a ValueError saying so."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"min_expert_tokens {value!r} is invalid; allowed: an integer >= 1 (default "
                         f"{MIN_EXPERT_TOKENS}; 1: only experts that received no token are pruned by magnitude)")
    return value


def add_cli_arguments(parser: Any) -> None:
    """``--min-expert-tokens N`` of ``llmprune prune`` (checked as ``check_min_expert_tokens`` checks it)."""
    from llmprune_kernels.cli_checks import min_expert_tokens

    parser.add_argument("--min-expert-tokens", type=min_expert_tokens, default=MIN_EXPERT_TOKENS, metavar="N",
                        help=f"MoE models: an expert that receives fewer calibration tokens is pruned by per-row "
                             f"magnitude instead of the method; 1: only experts that received none "
                             f"(default: {MIN_EXPERT_TOKENS})")


def expert_rule(pruners: Mapping[str, Any], linears: Mapping[str, nn.Module], config: SparsityConfig,
                min_expert_tokens: int = MIN_EXPERT_TOKENS, *, calibrated: bool = True) -> dict[str, Any]:
    """The layer's pruners with the expert rule applied (module docstring); other Linears' pruners unchanged.

    ``calibrated``: the statistics pass ran (``ExpertSlice.tokens`` counts its tokens). Without it (magnitude)
    every slice keeps its method and only gains its ``expert`` field. A replaced pruner is freed here.
    A run whose processes each feed a share of the calibration batches must sum every slice's ``tokens``
    over them before this (with the statistics), so that all decide on the run's token counts.
    """
    out = dict(pruners)
    for rel, lin in linears.items():
        if not isinstance(lin, ExpertSlice) or rel not in out:
            continue
        fields: dict[str, Any] = {"expert": lin.index}
        if calibrated:
            fields["expert_tokens"] = lin.tokens
            if lin.tokens < max(min_expert_tokens, 1):
                fields["expert_rule"] = "magnitude"
                out[rel].free()
                out[rel] = _RowMagnitude(lin, config, fields)
                continue
            fields["expert_rule"] = "calibrated"
        out[rel] = _Annotated(out[rel], fields)
    return out
