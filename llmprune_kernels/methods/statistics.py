"""Calibration statistics of a Linear's inputs as raw sums: the SparseGPT Hessian, Wanda's activation norms and
the per-feature moments (mean, variance) of DSnoT.

A pruner declares the statistic it needs (``LayerPruner.statistic``, ``LayerPruner.statistic_spec()``); the
pipeline creates one accumulator per distinct input and spec (q/k/v share one, gate/up one:
``pipeline.statistics``) and hands it to every pruner reading that input before ``prune()``.

Each accumulator keeps raw sums and the sequence count, so the statistics of several processes (a
``torch.distributed`` run over shards of the calibration set) add up by a plain all-reduce::

    for t in acc.tensors().values():
        torch.distributed.all_reduce(t)  # SUM
    H = acc.finalize()

``finalize()`` turns the sums into what the solver consumes, in place and once (later calls return the same
tensor): ``HessianSum`` gives ``H = (2/n) sum x x^T``, ``ActNormSum`` the mean squared column norm
``(1/n) sum ||x_j||^2``, ``ActMomentSum`` the per-feature ``ActMoments``. Both equal the running means of ``reference.sparsegpt.HessianStats`` and
``reference.wanda.ActNormStats`` up to fp32 rounding: every entry of H within ``HESSIAN_TOLERANCE`` (1e-5) of
the largest diagonal entry, the norms within rtol 2e-6 (python_tests/test_statistics.py), with the same
masks on the tiny test models.

A spec's kind may join several kinds with ``+`` (``"hessian+act_moments"``): one ``StatisticBundle`` feeds
each from the same inputs, for a method refined by another that reads a statistic of its own (DSnoT after
SparseGPT). Its raw sums are the parts' raw sums, so it all-reduces and replays like them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch

from llmprune_kernels.ops.act_norm import sq_norm_sum_
from llmprune_kernels.ops.sparsegpt import HESSIAN_TOLERANCE, gram_add_, gram_split, mirror_split_, tf32_matmul
from llmprune_kernels.validation import check_finite

__all__ = ["ActMomentSum", "ActMoments", "ActNormSum", "HESSIAN_TOLERANCE", "HessianSum", "StatisticBundle",
           "StatisticSpec", "make_statistic", "reference_statistic"]

KINDS = ("hessian", "act_norm", "act_moments")
MOMENT_CHUNK = 8192  # tokens per fp64 copy in ActMomentSum.add_batch (bounds its temporary memory)


@dataclass(frozen=True)
class StatisticSpec:
    """What to accumulate from a Linear's inputs; pruners of one method with equal specs can share it.

    ``kind``: ``"hessian"`` (``HessianSum``), ``"act_norm"`` (``ActNormSum``), ``"act_moments"``
    (``ActMomentSum``), or several joined by ``+`` (``StatisticBundle``). ``tensor_cores``
    (Hessian): fp16/bf16 activations on CUDA multiplied on tensor cores with fp32 accumulation, else cast
    to fp32 first. ``tf32`` (Hessian): TF32 for fp32 activations on CUDA. ``triton`` (act_norm): the
    Triton kernel where usable, else the PyTorch form.
    """

    kind: Literal[KINDS] | str
    in_features: int
    device: torch.device
    tensor_cores: bool = True
    tf32: bool = False
    triton: bool = False

    def __post_init__(self) -> None:
        parts = str(self.kind).split("+")
        if any(p not in KINDS for p in parts) or len(set(parts)) != len(parts):
            raise ValueError(f"unknown statistic {self.kind!r}; allowed: {', '.join(KINDS)}, or distinct ones "
                             "joined by '+'")
        if isinstance(self.in_features, bool) or not isinstance(self.in_features, int) or self.in_features < 1:
            raise ValueError(f"statistic width {self.in_features!r} is invalid; allowed: an integer >= 1")
        object.__setattr__(self, "device", torch.device(self.device))

    @property
    def parts(self) -> tuple[str, ...]:
        """The kinds this spec accumulates: its one kind, or those joined by ``+``."""
        return tuple(self.kind.split("+"))


def _check_sums(sums: torch.Tensor, name: str) -> None:
    """Sums of squares stay non-finite once a NaN/Inf (or an fp32 overflow) reached them."""
    if not bool(torch.isfinite(sums).all()):
        raise ValueError(f"{name}: the calibration activations contain NaN or Inf values (or their squares overflow "
                         f"fp32); pruning needs finite inputs")


class _RawSum:
    """Raw sum and sequence count (an int64 tensor beside the sum, so both all-reduce alike)."""

    def __init__(self, spec: StatisticSpec, shape: tuple[int, ...], name: str) -> None:
        self.spec, self.name = spec, name
        self.sum = torch.zeros(shape, dtype=torch.float32, device=spec.device)
        self.count = torch.zeros((), dtype=torch.int64, device=spec.device)
        self.value: torch.Tensor | None = None  # set by finalize()

    @property
    def in_features(self) -> int:
        return self.spec.in_features

    @property
    def nsamples(self) -> int:
        """Calibration sequences added (each leading batch entry of a 3-D input; a 2-D input is one)."""
        return int(self.count)

    @property
    def finalized(self) -> bool:
        return self.value is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The accumulator's state (raw sums and count), live: an in-place all-reduce (SUM) of each combines
        processes. Only before ``finalize()``."""
        self._check_open("tensors()")
        return {"sum": self.sum, "count": self.count}

    def _check_open(self, what: str) -> None:
        if self.value is not None:
            raise RuntimeError(f"{self.name}: {what} after finalize(); the statistic is already the solver's input")

    def _check_nonempty(self) -> int:
        n = self.nsamples
        if n <= 0:
            raise ValueError(f"{self.name}: no calibration data reached this layer")
        return n


class HessianSum(_RawSum):
    """``S = sum x^T x`` (fp32) over calibration batches; ``finalize()`` -> ``H = (2/n) S`` (SparseGPT's H)."""

    def __init__(self, spec: StatisticSpec, name: str = "activations") -> None:
        super().__init__(spec, (spec.in_features, spec.in_features), name)
        # wide inputs on CUDA: three block GEMMs of the upper half (gram_add_'s split), mirrored by finalize();
        # fixed by the spec, so accumulators of one spec (a distributed run's parts) combine by adding sums
        self.split = gram_split(spec.in_features, spec.device, spec.tensor_cores)

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor, name: str | None = None, check: bool = True) -> None:
        """Add (batch, seq, in) or (tokens, in) activations in any float dtype; NaN/Inf raise naming the layer.

        The finiteness check reads the updated diagonal (a NaN/Inf input makes its column's sum of squares
        non-finite): one sync, no extra pass over the activations. ``check=False`` leaves it to
        ``check_finite`` (one sync for all batches: a non-finite diagonal stays non-finite).
        """
        self._check_open("add_batch()")
        name = name or self.name
        if inp.shape[-1] != self.in_features:
            raise ValueError(f"{name} have width {inp.shape[-1]}, expected in_features={self.in_features}")
        if inp.device != self.sum.device:
            raise ValueError(f"{name} are on {inp.device}, the statistic on {self.sum.device}")
        x = inp.detach().reshape(-1, self.in_features)
        with tf32_matmul(self.spec.tf32):
            gram_add_(self.sum, x, tensor_cores=self.spec.tensor_cores, split=self.split)
        if check and not bool(torch.isfinite(self.sum.diagonal()).all()):
            check_finite(inp, name)  # raises the reference's message
            raise ValueError(f"{name}: the Hessian sum overflowed fp32")
        self.count += inp.shape[0] if inp.dim() == 3 else 1

    def check_finite(self) -> None:
        """Raise if a batch added with ``check=False`` held NaN/Inf (or overflowed fp32): one device sync."""
        _check_sums(self.sum.diagonal(), self.name)

    @torch.no_grad()
    def finalize(self) -> torch.Tensor:
        """``H = (2/n) * sum x x^T`` in place (fp32, (in, in)); the same tensor on every later call."""
        if self.value is None:
            n = self._check_nonempty()
            if self.split is not None:
                mirror_split_(self.sum, self.split)
            self.value = self.sum.mul_(2 / n)
        return self.value


class ActNormSum(_RawSum):
    """``s_j = sum ||x_j||^2`` (fp32) over calibration batches; ``finalize()`` -> ``s / n`` (Wanda's norms)."""

    def __init__(self, spec: StatisticSpec, name: str = "activations") -> None:
        super().__init__(spec, (spec.in_features,), name)

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor, name: str | None = None, check: bool = True) -> None:
        """Add (batch, seq, in) or (tokens, in) activations; NaN/Inf raise naming the layer (``check=False``:
        left to ``check_finite``, one sync for all batches)."""
        self._check_open("add_batch()")
        self.count += sq_norm_sum_(self.sum, inp, name or self.name, triton=self.spec.triton, check=check)

    def check_finite(self) -> None:
        """Raise if a batch added with ``check=False`` held NaN/Inf (or overflowed fp32): one device sync."""
        _check_sums(self.sum, self.name)

    @torch.no_grad()
    def finalize(self) -> torch.Tensor:
        """Mean squared L2 norm of each input column over the calibration sequences, in place (fp32, (in,))."""
        if self.value is None:
            self.value = self.sum.div_(self._check_nonempty())
        return self.value


class ActMoments(NamedTuple):
    """Per-feature input moments (fp32, (in,) each), as DSnoT reads them.

    ``seq_sum``: mean over calibration sequences of the feature's sum over the sequence's tokens (the
    original code's ``sum_metric_row``: the expected contribution of one sequence); ``var``: the variance over
    all calibration tokens; ``norm_sq``: the mean over sequences of the squared L2 norm (Wanda's statistic).
    """

    seq_sum: torch.Tensor
    var: torch.Tensor
    norm_sq: torch.Tensor


class ActMomentSum(_RawSum):
    """``[sum x_j, sum x_j^2, tokens]`` (fp64, one flat (2 in + 1,) tensor) over calibration batches;
    ``finalize()`` -> ``ActMoments``.

    fp64 sums keep the variance ``E[x^2] - E[x]^2`` accurate where a feature's mean is large against its spread;
    the token count rides in the same tensor, so one all-reduce of ``tensors()`` combines processes.
    """

    def __init__(self, spec: StatisticSpec, name: str = "activations") -> None:
        super().__init__(spec, (2 * spec.in_features + 1,), name)
        self.sum = self.sum.double()

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor, name: str | None = None) -> None:
        """Add (batch, seq, in) or (tokens, in) activations in any float dtype; NaN/Inf raise naming the layer.

        The batch's sums are formed apart (fp64, ``MOMENT_CHUNK`` tokens at a time) and added once, so the
        result depends on each batch alone and on the batch order, as ``ActNormSum``'s does.
        """
        self._check_open("add_batch()")
        name = name or self.name
        n = self.in_features
        if inp.shape[-1] != n:
            raise ValueError(f"{name} have width {inp.shape[-1]}, expected in_features={n}")
        if inp.device != self.sum.device:
            raise ValueError(f"{name} are on {inp.device}, the statistic on {self.sum.device}")
        x = inp.detach().reshape(-1, n)
        part = torch.zeros_like(self.sum)
        for chunk in x.split(MOMENT_CHUNK):
            xd = chunk.double()
            part[:n] += xd.sum(0)
            part[n:2 * n] += (xd * xd).sum(0)
        part[2 * n] = x.shape[0]
        if not bool(torch.isfinite(part[n:2 * n]).all()):
            check_finite(inp, name)  # raises the reference's message
        self.sum += part
        self.count += inp.shape[0] if inp.dim() == 3 else 1

    @torch.no_grad()
    def finalize(self) -> ActMoments:
        """The moments (fp32) from the raw sums; the same object on every later call."""
        if self.value is None:
            n, seqs = self.in_features, self._check_nonempty()
            total, sq, tokens = self.sum[:n], self.sum[n:2 * n], self.sum[2 * n].clamp(min=1)
            mean = total / tokens
            var = (sq / tokens - mean * mean).clamp(min=0)
            self.value = ActMoments((total / seqs).float(), var.float(), (sq / seqs).float())
        return self.value


class StatisticBundle:
    """Several statistics of the same inputs (a ``+``-joined kind), fed together: ``parts[kind]`` each.

    ``tensors()`` holds every part's raw sums (keys ``kind.name``); ``sum`` is the first part's, whose device
    is the bundle's. ``finalize()`` gives the parts' values as a dict by kind.
    """

    def __init__(self, spec: StatisticSpec, name: str = "activations") -> None:
        self.spec, self.name = spec, name
        self.parts = {k: make_statistic(replace(spec, kind=k), name) for k in spec.parts}
        self.value: dict | None = None

    @property
    def in_features(self) -> int:
        return self.spec.in_features

    @property
    def sum(self) -> torch.Tensor:
        return next(iter(self.parts.values())).sum

    @property
    def nsamples(self) -> int:
        return next(iter(self.parts.values())).nsamples

    @property
    def finalized(self) -> bool:
        return self.value is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{k}.{key}": t for k, part in self.parts.items() for key, t in part.tensors().items()}

    def add_batch(self, inp: torch.Tensor, name: str | None = None) -> None:
        for part in self.parts.values():
            part.add_batch(inp, name=name)

    def finalize(self) -> dict:
        if self.value is None:
            self.value = {k: part.finalize() for k, part in self.parts.items()}
        return self.value


_CLASSES = {"hessian": HessianSum, "act_norm": ActNormSum, "act_moments": ActMomentSum}


def make_statistic(spec: StatisticSpec, name: str = "activations"):
    """An empty accumulator for ``spec`` (a ``StatisticBundle`` for a ``+``-joined kind); ``name`` (e.g. the
    Linear's) goes into error messages."""
    if len(spec.parts) > 1:
        return StatisticBundle(spec, name)
    return _CLASSES[spec.kind](spec, name)


def reference_statistic(spec: StatisticSpec, inputs) -> torch.Tensor:
    """The reference running mean of ``spec``'s statistic over ``inputs`` (an iterable of batches), fp32.

    ``act_moments``: the ``ActMoments`` of all inputs at once in fp64 (the original DSnoT code keeps running
    means instead, and averages per-batch variances).
    """
    from llmprune_kernels.reference.sparsegpt import HessianStats
    from llmprune_kernels.reference.wanda import ActNormStats

    if spec.kind == "act_moments":
        xs = list(inputs)
        seqs = sum(x.shape[0] if x.dim() == 3 else 1 for x in xs)
        x = torch.cat([x.reshape(-1, spec.in_features) for x in xs]).double()
        return ActMoments((x.sum(0) / seqs).float(), x.var(0, unbiased=False).float(),
                          ((x * x).sum(0) / seqs).float())
    stats = (HessianStats if spec.kind == "hessian" else ActNormStats)(spec.in_features, device=spec.device)
    for x in inputs:
        stats.add_batch(x)
    return stats.H if spec.kind == "hessian" else stats.scaler_row
