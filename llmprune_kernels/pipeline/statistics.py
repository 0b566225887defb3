"""Feeding one decoder layer's pruners from forward hooks, one accumulator per distinct input.

Linears that read the very same input tensor in a forward call of the layer (LLaMA's q/k/v and gate/up, OPT's
q/k/v) share one accumulator when their pruners are of the same method and declare equal statistic specs
(``LayerPruner.statistic_spec()``): the statistic is computed once instead of per Linear, and held once. The
sharing is read off the forward pass, not from module names: a Linear joins the group of a Linear that got
the same tensor object (compared by identity, through weak references, so a freed tensor's reused memory never
matches) in the same call. Groups are fixed on each Linear's first input; in every later call the members of
a group must again receive the same tensors, or the feed raises naming them.

The statistics forward ends a call early where nothing after it is needed: when the first two calibration batches
called every Linear exactly once and in the same order (a dense decoder layer), later calls stop once the last
of them has had its input (LLaMA: before ``down_proj`` runs, about a fifth of the layer's FLOPs). Data-dependent
layers (MoE routing) that call a Linear twice or not at all keep running whole.

Pruners without a statistic (``statistic_spec()`` is None: user methods, SparseLLM's feed-forward block)
get every batch through ``add_batch`` as before; so does a subclass of a built-in method that overrides
``add_batch`` but not ``statistic_spec`` (``pipeline_spec``).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from llmprune_kernels.methods.statistics import make_statistic
from llmprune_kernels.pipeline.layerwise import StopForward

__all__ = ["LayerStatistics", "StatisticGroup", "feed_statistics", "pipeline_spec"]


def _owner(cls: type, attr: str) -> type:
    return next(c for c in cls.__mro__ if attr in c.__dict__)


def pipeline_spec(pruner: Any):
    """``pruner.statistic_spec()``, or None where the pipeline must call its ``add_batch``: the method
    declares no statistic, or a subclass overrides ``add_batch`` below the class that defines the spec."""
    cls = type(pruner)
    spec_owner = _owner(cls, "statistic_spec") if hasattr(cls, "statistic_spec") else None
    if spec_owner is None or (_owner(cls, "add_batch") is not spec_owner
                              and issubclass(_owner(cls, "add_batch"), spec_owner)):
        return None
    return pruner.statistic_spec()


class StatisticGroup:
    """One accumulator and the Linears (modules) feeding it, with this call's inputs."""

    def __init__(self, key: tuple, accumulator: Any, first: nn.Module, name: str) -> None:
        self.key, self.accumulator = key, accumulator
        self.members: list[nn.Module] = [first]
        self.names: list[str] = [name]
        self.added: list[weakref.ReferenceType] = []  # inputs added in the current forward call
        self.seen: dict[nn.Module, list[int]] = {}  # per member: indices into ``added``, this call

    def index(self, x: torch.Tensor) -> int | None:
        return next((i for i, r in enumerate(self.added) if r() is x), None)


class LayerStatistics:
    """Forward hooks for the Linears of one decoder layer, then ``deliver()`` hands each pruner its statistic.

    ``pruners``: Linear module -> its pruner. ``share=False`` gives every Linear an accumulator of its own
    (the same numbers; for comparisons). ``stop_early=False`` runs every call whole (see the module docstring).
    """

    def __init__(self, pruners: Mapping[nn.Module, Any], share: bool = True, stop_early: bool = True) -> None:
        self.pruners = dict(pruners)
        self.share = share
        self.specs = {m: pipeline_spec(p) for m, p in self.pruners.items()}
        self.groups: list[StatisticGroup] = []
        self.group_of: dict[nn.Module, StatisticGroup] = {}
        self.stop_early = stop_early
        self.calls = 0  # forward calls closed so far
        self.stopped = 0  # of them, ended early
        self._order: list[nn.Module] = []  # Linears in the order this call fed them
        self._first: list[nn.Module] | None = None
        self.stop_after: nn.Module | None = None

    def pre_hooks(self) -> dict[nn.Module, Callable]:
        """Forward pre-hooks, one per Linear: its input feeds the statistics before the Linear runs."""
        return {m: self._pre_hook(m) for m in self.pruners}

    def hooks(self, layer: nn.Module) -> dict[nn.Module, Callable]:
        """The forward hook on ``layer`` that closes each forward call run to the end."""
        return {layer: lambda module, inputs, output: self.end_call()}

    def _pre_hook(self, module: nn.Module) -> Callable:
        def hook(mod, args):
            self.on_input(module, args[0])
            self._order.append(module)
            if module is self.stop_after:
                self.stopped += 1
                self.end_call()
                raise StopForward
        return hook

    def on_input(self, module: nn.Module, x: torch.Tensor) -> None:
        """``module`` is about to run on ``x``: add it to its statistic, or hand it to the pruner's ``add_batch``."""
        if self.specs[module] is None:
            self.pruners[module].add_batch(x.detach())
        else:
            self.add(module, x)

    def _group_for(self, module: nn.Module, x: torch.Tensor) -> StatisticGroup:
        group = self.group_of.get(module)
        if group is not None:
            return group
        key = (type(self.pruners[module]), self.specs[module])
        if self.share:
            group = next((g for g in self.groups if g.key == key and g.index(x) is not None), None)
        name = getattr(self.pruners[module], "layer_name", type(module).__name__)
        if group is None:
            group = StatisticGroup(key, make_statistic(self.specs[module], name), module, name)
            self.groups.append(group)
        else:
            group.members.append(module)
            group.names.append(name)
        self.group_of[module] = group
        return group

    def add(self, module: nn.Module, x: torch.Tensor) -> None:
        """``module`` received ``x``: add it to its group's accumulator unless the group already did this call."""
        group = self._group_for(module, x)
        i = group.index(x)
        if i is None:
            acc = group.accumulator
            if hasattr(acc, "check_finite"):  # one finiteness check per layer (deliver), not a sync per batch
                acc.add_batch(x.detach(), check=False)
            else:
                acc.add_batch(x.detach())
            group.added.append(weakref.ref(x))
            i = len(group.added) - 1
        group.seen.setdefault(module, []).append(i)

    def end_call(self) -> None:
        """Close a forward call of the layer: check each group's members received the same inputs."""
        for g in self.groups:
            got = [g.seen.get(m, []) for m in g.members]
            if any(s != got[0] for s in got[1:]):
                raise ValueError(
                    f"Linears {', '.join(g.names)} shared their input tensor in an earlier calibration batch but "
                    "not in this one; their statistics cannot be shared (pass share=False to LayerStatistics)"
                )
            g.added, g.seen = [], {}
        self.calls += 1
        order, self._order = self._order, []
        if self.stop_early and self.calls <= 2:
            once = len(order) == len(self.pruners) and set(order) == set(self.pruners)
            if self.calls == 1:
                self._first = order if once else None
            elif once and order == self._first:
                self.stop_after = order[-1]

    def deliver(self) -> None:
        """Give every pruner with a statistic its accumulator (``use_statistic``); the feed keeps no reference.
        Accumulators fed without a per-batch check are checked here (NaN/Inf raise naming the Linears)."""
        for g in self.groups:
            if hasattr(g.accumulator, "check_finite"):
                g.accumulator.check_finite()
        for g in self.groups:
            for m in g.members:
                self.pruners[m].use_statistic(g.accumulator)
        self.groups, self.group_of = [], {}


def feed_statistics(step: Any, pruners: Mapping[nn.Module, Any], share: bool = True) -> list[list[str]]:
    """Run ``step``'s calibration batches through its layer (``LayerStep.forward``), accumulating each pruner's
    statistic (shared where Linears read the same input) or calling its ``add_batch``; then hand the
    statistics to the pruners. Returns the sharing groups as lists of Linear names (one per accumulator)."""
    stats = LayerStatistics(pruners, share=share)
    step.forward(stats.hooks(step.layer), pre_hooks=stats.pre_hooks())
    groups = [list(g.names) for g in stats.groups]
    stats.deliver()
    return groups
