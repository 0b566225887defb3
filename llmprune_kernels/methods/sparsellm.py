"""SparseLLM for the pipeline: attention projections by the local pruner, the feed-forward block jointly.

The pipeline creates one pruner per Linear of a decoder layer, feeds them all from one forward pass,
then calls ``prune()`` Linear by Linear. The pruners of one feed-forward block find each other through
a coordinator shared via ``prepare_model`` (the pipeline hands its return value to every pruner as the
argument ``model_info``). The block is solved when ``prune()`` has been called on its LAST Linear, so the
earlier ones are still dense when the pipeline snapshots them for its reconstruction-error report. Only
the block input X is stored (by the up projection's pruner); z, s, p and Y follow from X and the dense
weights. Options: ``SparseLLMOptions`` (``sparsellm_ffn``); the attention projections get the local
pruner with its defaults, SparseGPT's ``percdamp``, ``blocksize`` and ``backend`` passed on.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from llmprune_kernels.methods.base import LayerPruner, get_method, register_method
from llmprune_kernels.methods.sparsellm_ffn import FFNBlock, SparseLLMOptions, sparsellm_ffn_

log = logging.getLogger(__name__)

# Relative Linear names (suffixes of the pipeline's layer names) of the feed-forward block, per family.
ROLES = {
    "swiglu": {"mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"},
    "relu": {"fc1": "up", "fc2": "down"},
}


def ffn_kind(model: nn.Module) -> str:
    """"relu" for OPT (fc1 -> ReLU -> fc2), "swiglu" for the LLaMA family (SiLU-gated MLP)."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type == "opt":
        act = getattr(cfg, "activation_function", "relu")
        if act != "relu":
            raise ValueError(f"SparseLLM supports OPT with ReLU; this model uses activation {act!r}")
        return "relu"
    act = getattr(cfg, "hidden_act", None)
    if act in ("silu", "swish"):
        return "swiglu"
    raise ValueError(
        f"SparseLLM supports OPT (ReLU) and the LLaMA family (SiLU-gated MLP); {type(model).__name__} has "
        f"model_type={model_type!r}, hidden_act={act!r}"
    )


class SparseLLMCoordinator:
    """Shared by the pruners of one run: finds each block's Linears and solves the block once."""

    def __init__(self, kind: str, options: SparseLLMOptions) -> None:
        self.kind = kind
        self.options = options
        self.options.resolved(kind)  # validate now, before any layer is touched
        self.blocks: dict[str, dict[str, "SparseLLMPruner"]] = {}
        self.pruned: dict[str, set[str]] = {}
        self.reports: list[dict[str, Any]] = []

    def role(self, layer_name: str) -> tuple[str, str] | None:
        for suffix, role in ROLES[self.kind].items():
            if layer_name == suffix or layer_name.endswith("." + suffix):
                return layer_name[: -len(suffix)].rstrip("."), role
        return None

    def register(self, block: str, role: str, pruner: "SparseLLMPruner") -> None:
        self.blocks.setdefault(block, {})[role] = pruner
        self.pruned.setdefault(block, set())

    def mark_pruned(self, block: str, role: str) -> dict[str, Any]:
        self.pruned[block].add(role)
        members = self.blocks[block]
        if self.pruned[block] != set(ROLES[self.kind].values()):
            return {"sparsellm_block": block, "sparsellm_deferred": True}
        missing = set(ROLES[self.kind].values()) - set(members)
        if missing:
            raise ValueError(f"SparseLLM block {block}: no pruner for its {sorted(missing)} projection(s)")
        up = members["up"]
        if not up.inputs:
            raise ValueError(f"{block}: no calibration data reached the feed-forward block")
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in up.inputs])
        ffn = FFNBlock(self.kind, up.layer, members["down"].layer, members["gate"].layer if "gate" in members else None)
        report = sparsellm_ffn_(ffn, X, up.config, self.options, nsamples=up.nsamples, name=block)
        if report.get("sparsellm_warning"):
            log.warning(report["sparsellm_warning"])
        for p in members.values():
            p.inputs = []
        del self.blocks[block], self.pruned[block]
        self.reports.append({"block": block, **{k: v for k, v in report.items() if k != "sparsellm_options"}})
        return {"sparsellm_block": block, **report}

    def report(self) -> dict[str, Any]:
        return {"sparsellm": {"kind": self.kind, "options": vars(self.options.resolved(self.kind)),
                              "blocks": self.reports}}


def local_options(options: SparseLLMOptions) -> dict[str, Any]:
    """Options of the local pruner of the attention projections: SparseGPT gets its three."""
    if options.local == "sparsegpt":
        return {"percdamp": options.percdamp, "blocksize": options.blocksize, "backend": options.backend}
    return {}


@register_method("sparsellm")
class SparseLLMPruner(LayerPruner):
    """Feed-forward blocks pruned jointly by alternating updates, attention by a local pruner (Bai et al. 2024)."""

    Options = SparseLLMOptions
    refinable = False  # the feed-forward Linears are solved after their prune() calls

    @classmethod
    def prepare_model(cls, model, calibration, config, *, device=None, options=None,
                      progress=False) -> SparseLLMCoordinator:
        return SparseLLMCoordinator(ffn_kind(model), options if options is not None else SparseLLMOptions())

    @classmethod
    def cpu_cost(cls, config) -> str | None:
        return "about 45 minutes"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        coord = self.model_info
        if not isinstance(coord, SparseLLMCoordinator):
            raise ValueError(f"{self.layer_name}: method 'sparsellm' must be run through the pipeline "
                             "(prune_model), which calls SparseLLMPruner.prepare_model first")
        self.coord = coord
        self.inputs: list[torch.Tensor] = []
        self.nsamples = 0
        self.local: LayerPruner | None = None
        found = coord.role(self.layer_name)
        if found is None:  # attention projections (and anything outside the block): the local pruner
            self.local = get_method(self.options.local)(self.layer, self.config, local_options(self.options),
                                                        layer_name=self.layer_name)
            self.block = self.role = None
        else:
            self.block, self.role = found
            coord.register(self.block, self.role, self)

    def statistic_spec(self):
        """Attention projections: the local pruner's statistic (shared across q/k/v); the feed-forward block
        keeps its inputs through ``add_batch``."""
        return self.local.statistic_spec() if self.local is not None else None

    def use_statistic(self, stats) -> None:
        self.local.use_statistic(stats)

    def add_batch(self, inp: torch.Tensor) -> None:
        if self.local is not None:
            self.local.add_batch(inp)
            return
        self.nsamples += inp.shape[0] if inp.dim() == 3 else 1
        if self.role == "up":  # the block input X; everything else follows from it and the dense weights
            self.inputs.append(inp.detach())

    def prune(self) -> dict[str, Any]:
        if self.local is not None:
            return self.local.prune()
        return self.coord.mark_pruned(self.block, self.role)

    def free(self) -> None:
        if self.local is not None:
            self.local.free()
