"""The per-layer pruner interface the pipeline drives, and the method registry."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from llmprune_kernels.validation import SparsityConfig


class LayerPruner:
    """Prunes one ``nn.Linear`` from statistics of its calibration inputs.

    The pipeline calls ``add_batch`` (from a forward hook) for each calibration batch, then ``prune``
    once, then ``free``. ``prune`` modifies ``layer.weight`` in place and returns extra report fields.
    """

    name: str = "base"
    needs_calibration: bool = True

    def __init__(self, layer: nn.Linear, config: SparsityConfig, **options: Any) -> None:
        self.layer = layer
        self.config = config
        self.options = options

    def add_batch(self, inp: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def prune(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def free(self) -> None:
        """Release calibration statistics."""


_REGISTRY: dict[str, type[LayerPruner]] = {}


def register_method(name: str) -> Callable[[type[LayerPruner]], type[LayerPruner]]:
    """Class decorator adding a pruner to the registry under ``name``."""

    def deco(cls: type[LayerPruner]) -> type[LayerPruner]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[LayerPruner]:
    """Look up a pruner class; unknown names raise with the list of allowed ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; allowed: {', '.join(available_methods())}") from None
