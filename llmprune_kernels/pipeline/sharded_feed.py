"""The statistics side of a multi-process run (:mod:`llmprune_kernels.pipeline.distributed`, whose docstring says
why the result equals the one-process run's bit for bit): each rank feeds its own calibration batches, and after
every forward call the ranks combine that round's statistic inputs in global batch order.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from llmprune_kernels.methods.statistics import make_statistic
from llmprune_kernels.pipeline.statistics import LayerStatistics, StatisticGroup

# Statistics whose accumulator adds each batch's contribution to the running sum with one rounding
# (see the module docstring): their per-batch contributions are gathered; every other kind is replayed.
DECOMPOSABLE = frozenset({"act_norm"})
def _meta(x: torch.Tensor) -> tuple:
    return tuple(x.shape), x.stride(), x.storage_offset(), x.dtype


class ShardedFeed(LayerStatistics):
    """``LayerStatistics`` over this rank's batches; after each forward call (one round: global batches
    ``t * N .. t * N + N - 1``) the ranks combine that round's inputs in global batch order.

    A statistic group is known to all ranks by the position of its first Linear in ``pruners`` (an MoE
    expert may get tokens on some ranks only: a rank creates a group it has not seen when another reports it).
    """

    def __init__(self, strategy: Any, pruners: Mapping[nn.Module, Any]) -> None:
        """``strategy``: the run's :class:`~llmprune_kernels.pipeline.distributed.DistributedStrategy`."""
        super().__init__(pruners, share=True)
        self.s = strategy
        self.round = 0
        self.modules = list(self.pruners)
        self.position = {m: i for i, m in enumerate(self.modules)}
        self.pending: dict[StatisticGroup, list[Any]] = {}  # this call: contributions or inputs per group
        self.raw: dict[nn.Module, list[torch.Tensor]] = {m: [] for m, spec in self.specs.items() if spec is None}

    def on_input(self, module: nn.Module, x: torch.Tensor) -> None:
        if module in self.raw:
            self.raw[module].append(x.detach())
        else:
            self.add(module, x)

    def add(self, module: nn.Module, x: torch.Tensor) -> None:
        group = self._group_for(module, x)
        i = group.index(x)
        if i is None:
            spec = self.specs[module]
            if spec.kind in DECOMPOSABLE:  # this batch's contribution: an accumulator started at zero
                part = make_statistic(spec, group.accumulator.name)
                part.add_batch(x.detach())
                self.pending.setdefault(group, []).append(part)
            else:
                self.pending.setdefault(group, []).append(x.detach())
            group.added.append(weakref.ref(x))
            i = len(group.added) - 1
        group.seen.setdefault(module, []).append(i)

    def end_call(self) -> None:
        super().end_call()
        self._exchange(local=True)

    def finish(self) -> None:
        """The rounds without a batch of this rank, then each collector's Hessians to every rank."""
        while self.round < self.s.rounds:
            self._exchange(local=False)
        for gid, g in sorted((self._gid(g), g) for g in self.groups):
            if g.key[1].kind not in DECOMPOSABLE:
                for t in g.accumulator.tensors().values():
                    self.s._broadcast_(t, gid % self.s.world)

    def _gid(self, g: StatisticGroup) -> int:
        return self.position[g.members[0]]

    def _known(self, gid: int, members: list[int]) -> StatisticGroup:
        """The group ``gid`` with ``members`` (positions), created here if this rank has not seen it."""
        first = self.modules[gid]
        group = self.group_of.get(first)
        if group is None:
            pruner, spec = self.pruners[first], self.specs[first]
            name = getattr(pruner, "layer_name", type(first).__name__)
            group = StatisticGroup((type(pruner), spec), make_statistic(spec, name), first, name)
            self.groups.append(group)
            self.group_of[first] = group
        for p in members:
            m = self.modules[p]
            if m not in group.members and self.group_of.get(m) is None:
                group.members.append(m)
                group.names.append(getattr(self.pruners[m], "layer_name", type(m).__name__))
                self.group_of[m] = group
        if [self.position[m] for m in group.members] != members:
            raise RuntimeError(f"the ranks grouped the statistics of {', '.join(group.names)} differently; "
                               f"they cannot be combined")
        return group

    def _exchange(self, local: bool) -> None:
        s = self.s
        mine = None
        if local:
            mine = {"groups": {self._gid(g): ([self.position[m] for m in g.members],
                                              [(p.sum.cpu(), int(p.count)) if g.key[1].kind in DECOMPOSABLE
                                               else _meta(p) for p in parts])
                               for g, parts in self.pending.items()},
                    "raw": {self.position[m]: [_meta(x) for x in xs] for m, xs in self.raw.items()}}
        headers = s._all_gather_object(mine)
        present = [(j, h) for j, h in enumerate(headers) if h is not None]  # rank order = global batch order
        for gid in sorted({gid for _, h in present for gid in h["groups"]}):
            members = next(h["groups"][gid][0] for _, h in present if gid in h["groups"])
            g = self._known(gid, members)
            acc, own = g.accumulator, self.pending.get(g, [])
            parts = [(j, h["groups"][gid][1] if gid in h["groups"] else []) for j, h in present]
            if g.key[1].kind in DECOMPOSABLE:
                for _, contributions in parts:
                    for part, count in contributions:
                        acc.sum.add_(part.to(acc.sum.device))
                        acc.count += count
            else:
                self._replay(gid % s.world, parts, own, acc.sum.device, acc.add_batch)
        for module, xs in self.raw.items():
            p = self.position[module]
            self._replay(0, [(j, h["raw"][p]) for j, h in present], xs, module.weight.device,
                         self.pruners[module].add_batch)
        self.pending = {}
        for xs in self.raw.values():
            xs.clear()
        self.round += 1

    def _replay(self, collector: int, metas: list[tuple[int, list]], own: list, device: torch.device,
                add: Callable) -> None:
        """Every rank's inputs (``metas``: rank, its inputs' layouts; in rank order) into ``add`` on ``collector``."""
        s = self.s
        for j, layouts in metas:
            for k, meta in enumerate(layouts):
                if j == collector:
                    if s.rank == collector:
                        add(own[k])
                elif s.rank == j:
                    s._send(own[k], collector)
                elif s.rank == collector:
                    add(s._recv(meta, device, j))
