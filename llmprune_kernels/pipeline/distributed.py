"""Several processes pruning one model through ``torch.distributed`` (``torchrun --nproc-per-node N``).

Every process holds the model (or streams it) and walks the same decoder layers; what is shared out:

* the calibration batches: the windows are split into batches of ``batch_size`` as in a one-process run, and
  batch ``b`` belongs to rank ``b % N``; each rank captures the first-layer inputs of its own batches only and
  runs only those through each layer, both for the statistics and for the recompute of the layer outputs, so
  the hidden states stay sharded (1/N of them per process);
* the pruning: each Linear of a layer is pruned by one rank (``assign``), which then broadcasts the pruned
  weight to the others before the outputs are recomputed;
* the writing: rank 0 alone writes the output, the report and the resume checkpoints; the others read what
  they need of a checkpoint (a resumed run's completed layers) from the same file system.

Determinism: the statistics of a multi-process run equal the one-process run's bit for bit, because each
accumulator sees exactly the operations it would see in one process, in the same order.

* The batches are the same tensors (the same windows, split the same way) and each one runs through the
  same weights, so every Linear input of batch ``b`` has the same bits on its rank as in one process
  (given the same kernels: the same kind of device, and on CPU the same thread count).
* Activation norms (Wanda, GBLM): the one-process accumulator computes ``acc <- acc + c_b`` with a single
  rounding per batch, ``c_b`` depending on batch ``b`` alone (``acc += ||x||^2`` in PyTorch, or the Triton
  kernel's ``old + sum`` with fp fusion off). Each rank computes its batches' ``c_b`` (an accumulator
  started at zero holds ``0 + c_b = c_b`` exactly); every rank gathers all of them and adds them in global
  batch order, which is the very same sequence of fp32 additions.
* Hessians (SparseGPT) are not decomposable that way: ``addmm_`` adds ``x^T x`` into the running sum inside
  the GEMM (on CPU, K-blocked, so ``addmm(S, x) != S + x^T x`` in the last bits). Each Hessian group has a
  collector rank; the other ranks send it their Linear inputs (same shape, strides and storage offset) and
  it calls the accumulator's ``add_batch`` on every batch in global batch order, exactly as one process
  would. The finished raw sum is then broadcast, so any rank can prune any Linear of the group.
* Pruners that keep their own statistics (no ``statistic_spec``: SparseLLM's feed-forward block, user
  methods with ``add_batch``) get every batch's inputs the same way, on rank 0, which also prunes them.
* Reconstruction errors are kept per batch and added in global batch order too, so the report is the same.

The communication per layer is about one copy of the Hessian groups' Linear inputs (to their collectors),
N small vectors per batch for the activation norms, and the pruned weights.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llmprune_kernels.pipeline.layerwise import LayerStep, LayerStrategy
from llmprune_kernels.pipeline.resume import Checkpoint
from llmprune_kernels.pipeline.sharded_feed import ShardedFeed

__all__ = ["DistributedStrategy", "assign", "launched", "on_writer", "open_checkpoint", "rank_batches", "sharding"]

# A process waits this long in a collective for the others (rank 0 alone evaluates the dense model first).
DEFAULT_TIMEOUT = datetime.timedelta(hours=1)


def rank_batches(nbatches: int, world: int, rank: int) -> list[int]:
    """The global calibration batches of ``rank``: ``rank, rank + world, ...`` (each rank gets at least one)."""
    if nbatches < world:
        raise ValueError(f"{nbatches} calibration batch(es) cannot be shared by {world} processes; allowed: at least "
                         f"one batch per process (more windows, or a smaller batch size)")
    return list(range(rank, nbatches, world))


def assign(costs: Sequence[tuple[str, float]], world: int, fixed: Mapping[str, int] | None = None) -> dict[str, int]:
    """Linear name -> rank: ``fixed`` ones as given, the rest largest cost first to the least loaded rank
    (the lowest on ties). A pure function of its arguments, so every rank computes the same plan."""
    fixed = dict(fixed or {})
    load = [0.0] * world
    cost_of = dict(costs)
    for name, rank in fixed.items():
        load[rank] += cost_of.get(name, 0.0)
    plan = dict(fixed)
    order = sorted((i for i, (name, _) in enumerate(costs) if name not in fixed), key=lambda i: (-costs[i][1], i))
    for i in order:
        rank = min(range(world), key=lambda r: (load[r], r))
        plan[costs[i][0]] = rank
        load[rank] += costs[i][1]
    return plan


def _span(shape: tuple, stride: tuple) -> int:
    return 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0


class DistributedStrategy(LayerStrategy):
    """The ``LayerStrategy`` of one process of a ``torch.distributed`` run (see the module docstring).

    ``nbatches``: the global number of calibration batches (0 without calibration); ``batch_size`` splits
    the windows. It works on the default process group, which must be initialised (with NCCL, after
    ``torch.cuda.set_device``).
    """

    def __init__(self, nbatches: int, batch_size: int) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.writes = self.rank == 0
        self.nbatches, self.batch_size = nbatches, batch_size
        self.batches = rank_batches(nbatches, self.world, self.rank) if nbatches else []
        self.rounds = math.ceil(nbatches / self.world)
        backend = str(dist.get_backend())
        # where tensors travel: NCCL wants CUDA tensors, gloo CPU ones; a mixed group takes either
        self.comm = None if "nccl" in backend and "gloo" in backend else \
            torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        self._fed: tuple[int, set, dict] = (-1, set(), {})  # layer; its Linears fed by add_batch; statistic kinds
        self._owner: dict[str, int] = {}

    # ------------------------------------------------------------------------------------- data

    def windows(self, calibration: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's calibration windows: its batches, in order (split by ``batch_size`` they are those batches)."""
        if calibration is None:
            return None
        parts = calibration.split(self.batch_size)
        return torch.cat([parts[b] for b in self.batches])

    def feed_statistics(self, step: LayerStep, pruners: Mapping[nn.Module, Any]) -> list[list[str]]:
        """``statistics.feed_statistics`` over this rank's batches, the batches combined in global order."""
        feed = ShardedFeed(self, pruners)
        step.forward(feed.hooks(step.layer), pre_hooks=feed.pre_hooks())
        feed.finish()
        # Linears that count the tokens they saw (MoE expert slices: the expert rule reads it) count them all
        counted = [m for m in feed.modules if isinstance(getattr(m, "tokens", None), int)]
        if counted:
            for m, total in zip(counted, map(sum, zip(*self._all_gather_object([m.tokens for m in counted])))):
                m.tokens = total
        self._fed = (step.index, set(feed.raw),
                     {m: (spec.kind if spec is not None else None) for m, spec in feed.specs.items()})
        groups = [list(g.names) for g in feed.groups]
        feed.deliver()
        return groups

    def reduce_statistics(self, step: LayerStep, pruners: Mapping[str, Any]) -> None:
        pass  # feed_statistics already combined every rank's batches

    # ------------------------------------------------------------------------------------ pruning

    def assigned(self, step: LayerStep, linears: Mapping[str, nn.Linear]) -> list[str]:
        index, bundle, kinds = self._fed
        if index != step.index:  # no statistics forward in this step (magnitude)
            bundle, kinds = set(), {}
        costs = []
        for rel, lin in linears.items():
            cost = float(lin.out_features) * lin.in_features
            if lin in bundle or kinds.get(lin) == "hessian":  # the OBS update is ~ out * in^2
                cost *= lin.in_features
            costs.append((rel, cost))
        self._owner = assign(costs, self.world, {rel: 0 for rel, lin in linears.items() if lin in bundle})
        return [rel for rel in linears if self._owner[rel] == self.rank]

    def share_pruned(self, step: LayerStep, linears: Mapping[str, nn.Linear], pruned: list[str]) -> None:
        for rel, lin in linears.items():
            self._broadcast_(lin.weight.data, self._owner[rel])

    def gather_reports(self, seconds: dict[str, float], extras: dict[str, dict]) -> tuple[dict, dict]:
        """Every Linear's prune() time and report fields, from the rank that pruned it."""
        mine = {rel: (seconds[rel], extras.get(rel, {})) for rel in seconds}
        merged: dict[str, tuple] = {}
        for part in self._all_gather_object(mine):
            merged.update(part)
        return {k: v[0] for k, v in merged.items()}, {k: v[1] for k, v in merged.items()}

    def gather_errors(self, terms: dict[str, list]) -> dict[str, list]:
        """Per Linear, the reconstruction-error terms of every rank's batches in global batch order; each
        rank's list holds its batches in order, each batch's terms closed by a None."""
        parts = self._all_gather_object(terms)
        out = {}
        for rel in terms:
            per_rank = [_split_batches(part[rel]) for part in parts]
            out[rel] = [t for b in range(self.nbatches) for t in per_rank[b % self.world][b // self.world] + [None]]
        return out

    # ------------------------------------------------------------------------------ communication

    def _all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def _travel(self, t: torch.Tensor) -> torch.Tensor:
        return (t if self.comm is None else t.to(self.comm)).contiguous()

    def _broadcast_(self, t: torch.Tensor, src: int) -> None:
        buf = self._travel(t.detach())
        dist.broadcast(buf, src)
        if buf.data_ptr() != t.data_ptr():
            t.copy_(buf)

    def _send(self, t: torch.Tensor, dst: int) -> None:
        dist.send(self._travel(t.detach()), dst)

    def _recv(self, meta: tuple, device: torch.device, src: int) -> torch.Tensor:
        """A tensor of ``meta`` (shape, strides, storage offset, dtype) received from ``src``: the same
        layout (and alignment) as the sender's, so a kernel reading it takes the same path."""
        shape, stride, offset, dtype = meta
        buf = torch.empty(shape, dtype=dtype, device=device if self.comm is None else self.comm)
        dist.recv(buf, src)
        if offset == 0 and stride == buf.stride() and buf.device == device:
            return buf
        base = torch.empty(offset + _span(shape, stride), dtype=dtype, device=device)
        return base.as_strided(shape, stride, offset).copy_(buf)

    def on_writer(self, fn: Callable[[], Any], shared: Callable[[Any], Any] | None = None) -> Any:
        """``fn()`` on rank 0 only; the other ranks get ``shared(result)`` from it, or raise its error."""
        value, error = None, None
        if self.writes:
            try:
                value = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others learn of it
                error = exc
        box = [None]
        if self.writes:
            box = [(_picklable(error), None if error is not None or shared is None else shared(value))]
        dist.broadcast_object_list(box, src=0)
        if self.writes:
            if error is not None:
                raise error
            return value
        if box[0][0] is not None:
            raise box[0][0]
        return box[0][1]


def _split_batches(terms: list) -> list[list]:
    out, cur = [], []
    for t in terms:
        if t is None:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out


def _picklable(error: BaseException | None) -> BaseException | None:
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - an error that does not pickle travels as its text
        return RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")


# ---------------------------------------------------------------------------------- entry points


def sharding(distributed: bool | None, calibration: torch.Tensor | None, batch_size: int) -> DistributedStrategy | None:
    """The strategy of a run: ``None`` (this process does everything) unless ``torch.distributed`` is
    initialised with more than one process (``distributed=None``) or ``distributed=True`` demands it.
    ``calibration``: the windows the layers are walked with (``None``: no forward pass)."""
    ready = dist.is_available() and dist.is_initialized()
    if distributed and not ready:
        raise ValueError("distributed=True needs torch.distributed.init_process_group() first (torchrun sets up the "
                         "environment for it)")
    if distributed is False or not ready or dist.get_world_size() < 2:
        return None
    nbatches = 0 if calibration is None else math.ceil(calibration.shape[0] / batch_size)
    return DistributedStrategy(nbatches, batch_size)


def on_writer(strategy: DistributedStrategy | None, fn: Callable[[], Any],
              shared: Callable[[Any], Any] | None = None) -> Any:
    """``fn()`` in a one-process run; else ``DistributedStrategy.on_writer``."""
    return fn() if strategy is None else strategy.on_writer(fn, shared)


def open_checkpoint(strategy: DistributedStrategy | None, output_dir, identity: dict[str, Any], num_layers: int, *,
                    resume: bool) -> Checkpoint:
    """``Checkpoint.open`` on rank 0 (which holds the work directory); the other ranks get a read-only view
    of the same directory (its manifest, its completed layers' shards), or rank 0's error."""
    got = on_writer(strategy, lambda: Checkpoint.open(output_dir, identity, num_layers, resume=resume),
                    lambda ck: (str(ck.path), ck.manifest))
    if isinstance(got, Checkpoint):
        return got
    path, manifest = got
    return Checkpoint(Path(path), manifest, contextlib.ExitStack())


def launched(func: Callable[[Any], int]) -> Callable[[Any], int]:
    """``func`` (a CLI command) as run by each process under ``torchrun`` (``WORLD_SIZE`` > 1, ``prune`` only).

    Sets ``args.writes`` (False on ranks other than 0). Under torchrun it initialises the process group from
    the environment (NCCL on CUDA with ``cuda:LOCAL_RANK``, gloo on CPU) and, on ranks other than 0, turns off
    progress bars, evaluation and the report, and silences output: rank 0 prints, saves and reports.
    """
    def run(args) -> int:
        args.writes = True
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world < 2 or getattr(args, "command", None) != "prune" or dist.is_initialized():
            return func(args)
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda":
            if device.index not in (None, local):
                raise ValueError(f"--device {device} under torchrun: each process uses its own GPU, cuda:LOCAL_RANK; "
                                 f"allowed: --device cuda (or none)")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        args.device = str(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DEFAULT_TIMEOUT)
        try:
            with contextlib.ExitStack() as quiet:
                if rank != 0:
                    args.writes, args.quiet, args.evaluate, args.report = False, True, False, None
                    for name in ("plot", "tasks"):  # pictures and zero-shot runs: rank 0's
                        if hasattr(args, name):
                            setattr(args, name, None)
                    logging.getLogger().setLevel(logging.WARNING)
                    # rank 0 prints; an error of this rank still reaches stderr (printed once this block is left)
                    sink = quiet.enter_context(open(os.devnull, "w"))
                    quiet.enter_context(contextlib.redirect_stdout(sink))
                    quiet.enter_context(contextlib.redirect_stderr(sink))
                return func(args)
        finally:
            dist.destroy_process_group()
    return run
