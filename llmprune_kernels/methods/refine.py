"""Mask refinements that run after any per-Linear method: ``"wanda+dsnot"`` is Wanda, then DSnoT.

``get_method("METHOD+REFINEMENT")`` (the CLI's ``--method METHOD --refine REFINEMENT``) builds a
``RefinedPruner`` class around the registered method: one pruner per Linear that runs the method's pruner,
then the refinement on the Linear's dense and pruned weights. Its options are the method's and the
refinement's (``dsnot_*``) in one dataclass, so ``--option``, the report and ``--resume`` treat them alike.

The pipeline feeds the pair through one statistic: the method's kind joined with the refinement's
(``"hessian+act_moments"``, a ``StatisticBundle``), shared per distinct input as the method's alone would be.
A method without a statistic gets its ``add_batch`` calls as before, and the refinement keeps its own
accumulator. Methods whose ``prune()`` leaves the Linear to a later joint solve (``refinable = False``:
SparseLLM's feed-forward blocks) cannot be refined.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn

from llmprune_kernels.methods.base import LayerPruner, get_method, register_composed_methods
from llmprune_kernels.methods.dsnot import DSnoTOptions, dsnot_refine_
from llmprune_kernels.methods.statistics import StatisticBundle, StatisticSpec, make_statistic

__all__ = ["REFINEMENTS", "RefinedPruner", "Refinement", "refined_method", "refined_name"]


@dataclass(frozen=True)
class Refinement:
    """A mask refinement: its ``Options`` dataclass, the statistic it reads, and ``apply(layer, dense, value,
    config, options) -> report fields`` (``value``: the statistic's ``finalize()``)."""

    name: str
    Options: type
    statistic: str
    apply: Callable[..., dict[str, Any]]
    doc: str


REFINEMENTS = {
    "dsnot": Refinement("dsnot", DSnoTOptions, "act_moments", dsnot_refine_,
                        "DSnoT: training-free grow/prune swaps per row toward zero expected error (Zhang et al. 2023)"),
}


def refined_name(method: str, refine: str | None) -> str:
    """``"wanda+dsnot"`` from ``("wanda", "dsnot")``; ``method`` itself when ``refine`` is None or empty."""
    return f"{method}+{refine}" if refine else method


class RefinedPruner(LayerPruner):
    """The class ``refined_method`` subclasses for one method and refinement (class attributes ``method``,
    ``refinement``); ``inner`` is the method's pruner of this Linear."""

    method: type[LayerPruner] = LayerPruner
    refinement: Refinement = REFINEMENTS["dsnot"]

    def __init__(self, layer: nn.Linear, config, options: Any = None, *, layer_name: str = "layer",
                 model_info: Any = None, **kwargs: Any) -> None:
        super().__init__(layer, config, options, layer_name=layer_name, model_info=model_info, **kwargs)
        inner_opts, self.refine_options = _split(self.options, self.method.Options, self.refinement.Options)
        self.inner = self.method(layer, config, inner_opts, layer_name=layer_name, model_info=model_info)
        skips = getattr(self.refine_options, "skips", None)
        self.refining = not (callable(skips) and skips(layer_name))
        self.moments = None  # the refinement's accumulator

    @classmethod
    def cpu_cost(cls, config) -> str | None:
        return cls.method.cpu_cost(config)

    def _inner_spec(self) -> StatisticSpec | None:
        from llmprune_kernels.pipeline.statistics import pipeline_spec  # the pipeline imports the methods

        return pipeline_spec(self.inner)

    def statistic_spec(self) -> StatisticSpec | None:
        """The method's statistic joined with the refinement's; the method's alone for a skipped Linear; None
        (``add_batch``) for a method that wants every batch itself."""
        inner, kind = self._inner_spec(), self.refinement.statistic
        if not self.refining or (inner is not None and kind in inner.parts):
            return inner
        if inner is None:
            return None if self.method.needs_calibration else StatisticSpec(kind, self.layer.in_features,
                                                                            self.layer.weight.device)
        return replace(inner, kind=f"{inner.kind}+{kind}")

    def use_statistic(self, stats) -> None:
        """Split the joined statistic: the refinement's part to this pruner, the rest to the method's."""
        inner, kind = self._inner_spec(), self.refinement.statistic
        if self.refining:
            self.moments = stats.parts[kind] if isinstance(stats, StatisticBundle) else stats
        if inner is None:
            return
        if isinstance(stats, StatisticBundle) and kind not in inner.parts:
            rest = [part for k, part in stats.parts.items() if k != kind]
            stats = rest[0] if len(rest) == 1 else stats
        self.inner.use_statistic(stats)

    def add_batch(self, inp: torch.Tensor) -> None:
        """A calibration batch: to the method's pruner (if it takes data) and the refinement's accumulator."""
        if self.method.needs_calibration:
            self.inner.add_batch(inp)
        if self.refining:
            if self.moments is None:
                spec = StatisticSpec(self.refinement.statistic, self.layer.in_features, self.layer.weight.device)
                self.moments = make_statistic(spec, self.layer_name)
            self.moments.add_batch(inp, name=self.layer_name)

    def prune(self) -> dict[str, Any]:
        if not self.refining:
            return {**(self.inner.prune() or {}), f"{self.refinement.name}_skipped": True}
        if self.moments is None or self.moments.nsamples == 0:
            raise ValueError(f"{self.layer_name}: no calibration data reached this layer")
        dense = self.layer.weight.detach().clone()
        extra = dict(self.inner.prune() or {})
        extra.update(self.refinement.apply(self.layer, dense, self.moments.finalize(), self.config,
                                           self.refine_options))
        return extra

    def free(self) -> None:
        self.inner.free()
        self.moments = None


_CLASSES: dict[tuple[type, str], type[RefinedPruner]] = {}


def refined_method(name: str) -> type[RefinedPruner]:
    """The pruner class of ``"METHOD+REFINEMENT"``; errors name the bad part and what is allowed."""
    method, _, refine = name.rpartition("+")
    if refine not in REFINEMENTS:
        raise ValueError(f"unknown refinement {refine!r} in method {name!r}; allowed: {', '.join(REFINEMENTS)}")
    if "+" in method:
        raise ValueError(f"method {name!r} refines twice; allowed: one refinement, e.g. 'wanda+{refine}'")
    cls = get_method(method)
    if not getattr(cls, "refinable", True):
        raise ValueError(f"method {method!r} cannot be refined by {refine!r}: its prune() leaves Linears to a joint "
                         "solve; allowed: a per-Linear method such as magnitude, wanda, sparsegpt or gblm")
    key = (cls, refine)
    if key not in _CLASSES:
        _CLASSES[key] = _build(cls, REFINEMENTS[refine])
    return _CLASSES[key]


def _build(cls: type[LayerPruner], refinement: Refinement) -> type[RefinedPruner]:
    summary = ((cls.__doc__ or "").strip().splitlines() or [cls.name])[0].rstrip(".")
    attrs: dict[str, Any] = {
        "name": f"{cls.name}+{refinement.name}", "method": cls, "refinement": refinement,
        "Options": _merged_options(cls, refinement), "needs_calibration": True,
        "__doc__": f"{summary}; then {refinement.doc}.",
    }
    prepare = getattr(cls, "prepare_model", None)
    if callable(prepare):  # e.g. GBLM's gradient pass, given the method's part of the options
        def prepare_model(klass, model, calibration, config, *, device=None, options=None, progress=False):
            inner = None if options is None else _split(options, cls.Options, refinement.Options)[0]
            return prepare(model, calibration, config, device=device, options=inner, progress=progress)
        attrs["prepare_model"] = classmethod(prepare_model)
    return type(f"{cls.__name__}With{refinement.name.capitalize()}", (RefinedPruner,), attrs)


def _merged_options(cls: type[LayerPruner], refinement: Refinement) -> type:
    """One frozen dataclass with the method's options, then the refinement's; ``validate`` checks both."""
    fields, seen = [], set()
    for part in (cls.Options, refinement.Options):
        hints = typing.get_type_hints(part)
        for f in dataclasses.fields(part):
            if f.name in seen:
                raise ValueError(f"method {cls.name!r} and refinement {refinement.name!r} both declare option "
                                 f"{f.name!r}; a refinement's options need names of their own")
            seen.add(f.name)
            default = (dict(default_factory=f.default_factory) if f.default_factory is not dataclasses.MISSING
                       else dict(default=f.default))
            fields.append((f.name, hints[f.name], dataclasses.field(**default, metadata=f.metadata)))

    def validate(self) -> None:
        for part in _split(self, cls.Options, refinement.Options):
            check = getattr(part, "validate", None)
            if callable(check):
                check()
        if getattr(self, "quantize", "none") != "none":  # a refinement regrows weights off the 8-bit grid
            raise ValueError(f"option quantize={self.quantize!r} of method {cls.name!r} rounds the weights to 8 bits "
                             f"after pruning, which refinement {refinement.name!r} would undo; allowed with a "
                             f"refinement: quantize='none'")

    return dataclasses.make_dataclass(f"{cls.Options.__name__}With{refinement.name.capitalize()}", fields,
                                      frozen=True, namespace={"validate": validate})


def _split(options: Any, *parts: type) -> list[Any]:
    """``options`` (a merged instance) as one instance of each of ``parts``."""
    return [part(**{f.name: getattr(options, f.name) for f in dataclasses.fields(part)}) for part in parts]


register_composed_methods(refined_method)
