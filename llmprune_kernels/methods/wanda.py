"""Wanda pruner for the pipeline: activation-norm statistics (``methods.statistics``), then per-row scoring
and masking.

Both backends give bit-identical masks; the statistics agree within fp32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from llmprune_kernels.methods.base import LayerPruner, option, register_method
from llmprune_kernels.ops.score_mask import score_and_mask, triton_usable
from llmprune_kernels.methods.statistics import StatisticSpec
from llmprune_kernels.reference.wanda import wanda_prune_

BACKENDS = ("auto", "reference", "triton")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """``"triton"`` or ``"reference"`` for weights on ``device``; errors name the bad choice."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "reference"
    if backend == "triton" and not triton_usable(device):
        raise ValueError(
            f"backend 'triton' cannot run on device {device}: it needs a CUDA GPU with triton installed, or "
            "TRITON_INTERPRET=1 set before importing llmprune_kernels; allowed here: 'reference' or 'auto'"
        )
    return backend


@dataclass(frozen=True)
class WandaOptions:
    """Options of ``wanda``."""

    backend: Literal[BACKENDS] = option("auto", "'auto': the fused Triton kernels on CUDA, else the PyTorch "
                                                "reference; 'triton' runs on CPU only under TRITON_INTERPRET=1")


class ActNormPruner(LayerPruner):
    """A pruner scored from the shared activation norms, on the fused Triton kernels or the reference: its
    options' ``backend`` resolved once, the norms accumulated on the Triton kernel with it (Wanda, GBLM)."""

    statistic = "act_norm"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = resolve_backend(self.options.backend, self.layer.weight.device)

    def statistic_spec(self) -> StatisticSpec:
        layer = self.layer
        return StatisticSpec("act_norm", layer.in_features, layer.weight.device, triton=self.backend == "triton")


@register_method("wanda")
class WandaPruner(ActNormPruner):
    """|W| times the input-activation norm, per output row (Sun et al. 2023)."""

    Options = WandaOptions

    def prune(self) -> dict[str, Any]:
        norms = self.finalized_statistic()
        weight = self.layer.weight.data
        if self.backend == "triton" and triton_usable(weight.device):
            score_and_mask(weight, norms.to(weight.device), self.config, inplace=True, mask=False)
        else:
            wanda_prune_(weight, norms.to(weight.device), self.config)
        return {"backend": self.backend}

    def free(self) -> None:
        self.stats = None
