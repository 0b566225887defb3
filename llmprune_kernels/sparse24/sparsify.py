"""``sparsify_``: swap a model's 2:4 Linears (and fused MoE experts) for their sparse drop-ins.

Two call forms: ours, ``sparsify_(model, filter_fn=None, *, tune=..., ...)``, which swaps every Linear whose
weight is already 2:4 (or those ``filter_fn(name, module)`` picks); and torchao's, ``sparsify_(model,
SemiSparseWeightConfig(), filter_fn)``, whose filter is asked ``filter_fn(module, fqn)`` about every module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from llmprune_kernels.sparse24 import dispatch, quant8, tuning, tuning8
from llmprune_kernels.sparse24.experts import pack_experts, swap_experts
from llmprune_kernels.sparse24.linear import SparseLinear, _is_24
from llmprune_kernels.sparse24.linear8 import SparseLinear8
from llmprune_kernels.sparse24.quant8 import check_activations
from llmprune_kernels.validation import SparsityConfig

@dataclass(frozen=True)
class SemiSparseWeightConfig:
    """Pack the picked Linears' 2:4-sparse weights into :class:`SparseLinear` (``sparsify_``'s torchao-style config).

    Named and called as torchao's removed ``torchao.sparsity.SemiSparseWeightConfig``, so
    ``sparsify_(model, SemiSparseWeightConfig(), filter_fn)`` moves over by changing its import. As there, the
    default filter picks every ``nn.Linear`` and nothing is pruned here: prune to 2:4 first (``prune_model`` with
    ``SparsityConfig(n=2, m=4)``); a picked weight that is not 2:4 is an error naming the module.

    ``weight_dtype`` (ours, opt-in): None keeps the Linear's 16-bit values (:class:`SparseLinear`); ``"fp8"``
    (e4m3; GPUs of compute capability 8.9+, and the CPU) or ``"int8"`` stores them in 8 bits with scales
    (:class:`~llmprune_kernels.sparse24.linear8.SparseLinear8`, :mod:`~llmprune_kernels.sparse24.quant8`):
    ``group_size`` None (one scale per output channel) or a multiple of 4 input columns, ``scale_dtype``
    ``"float32"`` or ``"float16"``. ``activations`` (opt-in, with an 8-bit ``weight_dtype`` and per-channel scales):
    ``"16bit"`` keeps the activations in the module's dtype; ``"8bit"`` lets M > 16 calls on CUDA quantise them
    per token to the weight's 8-bit type and run cuSPARSELt's 8-bit 2:4 GEMM (backend ``cslt8``) in the M buckets
    where tuning measured it faster than the 16-bit fallback (results differ from 16-bit activations by that
    quantisation: ``reference.sparse24_8bit.sparse24_8bit_act_linear_reference``).
    """

    weight_dtype: str | None = None
    group_size: int | None = None
    scale_dtype: str = "float32"
    activations: str = "16bit"

    def __post_init__(self):
        check_activations(self.activations)
        if self.activations == "8bit" and (self.weight_dtype is None or self.group_size is not None):
            raise ValueError(f"activations='8bit' (weight_dtype={self.weight_dtype!r}, group_size={self.group_size!r}) "
                             f"quantises activations to the weight's 8-bit type with one weight scale per output "
                             f"channel; allowed with it: weight_dtype='fp8' or 'int8' and group_size=None")
        if self.weight_dtype is None:
            if self.group_size is not None or self.scale_dtype != "float32":
                raise ValueError(f"group_size={self.group_size!r} / scale_dtype={self.scale_dtype!r} describe 8-bit "
                                 f"weights; allowed with them: weight_dtype='fp8' or 'int8'")
            return
        if self.weight_dtype not in quant8.WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype {self.weight_dtype!r} is not supported; allowed: None (the Linear's "
                             f"16-bit values), {', '.join(repr(k) for k in quant8.WEIGHT_DTYPES)}")
        quant8.check_group_size(self.group_size)
        quant8.scale_dtype_of(self.scale_dtype)


semi_sparse_weight = SemiSparseWeightConfig  # torchao's older name for the same config


def _torchao_default_filter(module: nn.Module, fqn: str) -> bool:
    """torchao's default: every ``nn.Linear`` but MultiheadAttention's ``out_proj`` (which it never swaps)."""
    return isinstance(module, nn.Linear) and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _callable_or_none(filter_fn: Any) -> Callable[[nn.Module, str], bool] | None:
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn {filter_fn!r} ({type(filter_fn).__name__}) is not callable; allowed: None or a "
                        f"function (module, fqn) -> bool (tune, table, ... are keyword arguments)")
    return filter_fn


def _config_and_filter(config: Any, filter_fn: Any) -> tuple[bool, Callable[[nn.Module, str], bool] | None]:
    """(torchao semantics, filter) from ``sparsify_``'s second and third arguments; the second may also be the
    filter_fn of the older ``sparsify_(model, filter_fn)``."""
    if isinstance(config, SemiSparseWeightConfig):
        return True, _callable_or_none(filter_fn)
    if config is None or (callable(config) and not isinstance(config, type)):
        if config is not None and filter_fn is not None:
            raise TypeError("sparsify_ got two filter functions (as config and as filter_fn); pass "
                            "sparsify_(model, SemiSparseWeightConfig(), filter_fn) or sparsify_(model, filter_fn=...)")
        return False, _callable_or_none(config if config is not None else filter_fn)
    what = f"{config!r} ({type(config).__name__})"
    allowed = ("allowed: SemiSparseWeightConfig() (sparsify_(model, SemiSparseWeightConfig(), filter_fn), as in "
               "torchao), None, or a filter_fn (module, fqn) -> bool")
    if isinstance(config, type) and issubclass(config, SemiSparseWeightConfig):
        raise TypeError(f"config {what} is the class; pass an instance: SemiSparseWeightConfig()")
    if type(config).__name__ == "SemiSparseWeightConfig":  # torchao's own, still imported from torchao
        raise TypeError(f"config {what} is from {type(config).__module__}; use this package's: "
                        f"from llmprune_kernels import SemiSparseWeightConfig, sparsify_")
    if isinstance(config, SparsityConfig):
        raise TypeError(f"config {what} describes pruning, not packing; {allowed}. sparsify_ takes no sparsity: "
                        f"prune first (prune_model with SparsityConfig(n=2, m=4)), then sparsify_ packs the 2:4 "
                        f"Linears")
    if hasattr(config, "__dataclass_fields__"):  # another library's config (torchao's quantization configs ...)
        raise TypeError(f"config {what} is not supported; {allowed}")
    # the wording keeps the older "filter_fn X is not callable" message for sparsify_(model, 0.5)
    raise TypeError(f"config {what} is not a SemiSparseWeightConfig, and as a filter_fn {what} is not callable; "
                    f"{allowed}. sparsify_ takes no sparsity: prune first (prune_model with SparsityConfig(n=2, m=4)), "
                    f"then sparsify_(model) packs the 2:4 Linears")


def _picked(model: nn.Module, torchao: bool, filter_fn) -> list[tuple[str, nn.Linear]]:
    """The (fqn, Linear) pairs to swap, in ``named_modules`` order."""
    out = []
    for fqn, mod in model.named_modules():
        if torchao:
            # torchao asks its filter about every module (fqn "" is the model itself) and swaps what it picks
            if not (filter_fn or _torchao_default_filter)(mod, fqn):
                continue
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"filter_fn picked {fqn or 'the model'!r} ({type(mod).__name__}), not an nn.Linear; "
                                f"sparsify_ swaps nn.Linear modules only: return True for Linears only, e.g. "
                                f"isinstance(module, nn.Linear) and ...")
        elif not isinstance(mod, nn.Linear) or (filter_fn is None and not _is_24(mod.weight)) or (
                filter_fn is not None and not filter_fn(mod, fqn)):
            continue
        out.append((fqn, mod))
    return out


@torch.no_grad()
def sparsify_(
    model: nn.Module,
    config: SemiSparseWeightConfig | Callable[[nn.Module, str], bool] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    tune: bool = True,
    table: dispatch.TuningTable | str | None = None,
    save_table: str | None = None,
    buckets: tuple[int, ...] = dispatch.BUCKETS,
    dense_tolerance: float = 0.0,
) -> nn.Module:
    """Swap the model's 2:4 ``nn.Linear`` modules for :class:`SparseLinear` in place; returns ``model``.

    Two ways to pick the Linears:

    * torchao's: ``sparsify_(model, SemiSparseWeightConfig(), filter_fn=None)``. ``filter_fn(module, fqn)`` is
      asked about every module (as torchao does) and must pick only Linears; by default every ``nn.Linear``.
    * ours: ``sparsify_(model)`` or ``sparsify_(model, filter_fn)`` / ``filter_fn=...``: the filter is asked
      about each ``nn.Linear``; by default every Linear whose weight is 2:4-sparse (an unpruned ``lm_head``
      stays dense).

    A picked weight that is not 2:4 raises, naming the module, row and group, before any module is swapped.
    Fused MoE experts (transformers 5's 3-D ``gate_up_proj`` / ``down_proj``) become
    :class:`~llmprune_kernels.sparse24.experts.SparseExperts` (one SparseLinear per expert matrix): by default
    those whose matrices are all 2:4; with our filter, those it picks (it is asked about the experts module too).
    On CUDA each distinct (out, in, dtype) is tuned once (``tune=True``) unless ``table`` (a
    :class:`TuningTable` or a JSON path from ``save_table``) already holds it; caches are then built.
    ``buckets``: the M buckets to measure (fewer = faster tuning; unmeasured buckets use the defaults).
    ``dense_tolerance`` in [0, 1): where dense measured fastest but a sparse path within this fraction of its
    time, run the sparse path and keep no dense copy of the weight (memory for up to that much speed).
    """
    if isinstance(filter_fn, bool):
        raise TypeError(f"filter_fn={filter_fn!r}: pass tune by keyword, sparsify_(model, ..., tune={filter_fn!r})")
    torchao, filter_fn = _config_and_filter(config, filter_fn)
    dense_tolerance = dispatch.check_dense_tolerance(dense_tolerance)
    if isinstance(table, str):
        table = dispatch.TuningTable.load(table)
    picked = _picked(model, torchao, filter_fn)
    if isinstance(model, nn.Linear) and picked:
        raise ValueError("sparsify_ swaps Linear children of a model; wrap a bare Linear with SparseLinear.from_linear")

    q8 = config if torchao and config.weight_dtype is not None else None
    if q8 is not None:  # FP8 on a GPU without it: one error before any work
        for _, lin in picked:
            quant8.check_fp8_device(quant8.weight_dtype_of(q8.weight_dtype), lin.weight.device)
    experts = pack_experts(model, filter_fn)  # fused MoE experts whose matrices are 2:4 -> SparseExperts
    if q8 is not None:
        for _, sparse in experts:
            for mods in (sparse.gate_up, sparse.down):
                for i, sl in enumerate(mods):
                    mods[i] = SparseLinear8.from_linear(sl, q8.weight_dtype, q8.group_size, q8.scale_dtype)
    new = []
    for fqn, lin in picked:  # pack every picked weight before swapping any: a bad one leaves the model as it was
        try:
            new.append(SparseLinear.from_linear(lin) if q8 is None else
                       SparseLinear8.from_linear(lin, q8.weight_dtype, q8.group_size, q8.scale_dtype))
        except ValueError as exc:
            hint = (" (the default filter picks every nn.Linear: pass a filter_fn to leave dense ones, e.g. "
                    "lambda module, fqn: isinstance(module, nn.Linear) and 'lm_head' not in fqn)"
                    if torchao and filter_fn is None else "")
            raise ValueError(f"{fqn}: {exc}{hint}") from None
    for (fqn, _), sl in zip(picked, new):
        parent_name, _, child = fqn.rpartition(".")
        sl.table = table
        sl.dense_tolerance = dense_tolerance
        setattr(model.get_submodule(parent_name) if parent_name else model, child, sl)
    new += swap_experts(model, experts, table, dense_tolerance)
    if q8 is not None:
        for m in new:
            if isinstance(m, SparseLinear8):
                m.activations = q8.activations
    cuda_shapes = {m._shape() for m in new if m.values.is_cuda}  # (out, in, dtype the 16-bit paths run)
    if cuda_shapes and tune:
        t = tuning.tune(sorted(cuda_shapes, key=str), table, device=new[0].values.device, buckets=buckets)
        act8 = {(*m._shape(), m.values.dtype) for m in new  # after the 16-bit tuning: its choices are the fallbacks
                if isinstance(m, SparseLinear8) and m.values.is_cuda and m.act8_key() is not None}
        if act8:
            tuning8.tune_act8(sorted(act8, key=str), t, device=new[0].values.device, buckets=buckets)
        q8 = {(*m._shape(), m.values.dtype) for m in new if isinstance(m, SparseLinear8) and m.values.is_cuda}
        if q8:
            tuning8.tune_q8(sorted(q8, key=str), t, device=new[0].values.device, buckets=buckets)
        if save_table:
            t.save(save_table)
    for m in new:
        m.prepare()
    return model
