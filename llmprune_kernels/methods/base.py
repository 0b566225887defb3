"""The per-layer pruner interface the pipeline drives, the method registry, and typed method options.

Each method declares its options as a dataclass (``LayerPruner.Options``) whose fields carry a default and
a one-line doc (``option(default, doc)``). ``check_options`` is the one check every entry point uses (the
CLI's ``--option KEY=VALUE`` and ``prune_model(options=...)``): unknown names and ill-typed values fail
with the list of allowed options, before any work is done.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple, Union

import torch
from torch import nn

from llmprune_kernels.methods.statistics import ActNormSum, HessianSum, StatisticSpec, make_statistic
from llmprune_kernels.validation import SparsityConfig


def option(default: Any, doc: str) -> Any:
    """A dataclass field with its default and one-line doc (shown by ``llmprune methods``)."""
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class NoOptions:
    """The options of a method that takes none."""


class LayerPruner:
    """Prunes one ``nn.Linear`` from statistics of its calibration inputs.

    The pipeline feeds each calibration batch, then calls ``prune`` once, then ``free``. ``prune``
    modifies ``layer.weight`` in place and returns extra report fields. ``options``: an ``Options``
    instance or a mapping; keyword arguments are options too. ``layer_name`` (for messages) and
    ``model_info`` (what ``prepare_model`` returned) come from the pipeline.

    Feeding, two ways:

    * ``statistic = None`` (the default): ``add_batch(inp)`` gets every calibration batch of this
      Linear's inputs (from a forward hook); the method keeps whatever state it needs.
    * ``statistic = "hessian"`` or ``"act_norm"``: the pipeline accumulates that statistic
      (``methods.statistics``) once per distinct input and ``statistic_spec()``, shared by the
      Linears reading it (q/k/v, gate/up), and hands it over by ``use_statistic`` before ``prune``;
      ``self.stats.finalize()`` then gives H or the activation norms. ``add_batch`` still works
      (an accumulator of this pruner's own), for use outside the pipeline.
    """

    name: str = "base"
    needs_calibration: bool = True
    Options: type = NoOptions
    statistic: str | None = None  # "hessian" | "act_norm": accumulated by the pipeline, see the class doc
    refinable: bool = True  # a refinement (methods.refine) may follow prune(); False where a joint solve does

    def __init__(self, layer: nn.Linear, config: SparsityConfig, options: Any = None, *,
                 layer_name: str = "layer", model_info: Any = None, **kwargs: Any) -> None:
        if kwargs:
            options = {**_as_dict(options), **kwargs}
        self.layer = layer
        self.config = config
        self.options = check_options(type(self), options)
        self.layer_name = layer_name
        self.model_info = model_info
        if self.statistic is not None:
            self.stats = None  # the accumulator: set by use_statistic, or by the first add_batch

    def statistic_spec(self) -> StatisticSpec | None:
        """What the pipeline accumulates for this pruner (``None``: it calls ``add_batch`` instead).

        Default: ``statistic`` of this Linear's width on its weight's device; methods add their options.
        """
        if self.statistic is None:
            return None
        return StatisticSpec(self.statistic, self.layer.in_features, self.layer.weight.device)

    def use_statistic(self, stats: HessianSum | ActNormSum) -> None:
        """Receive the (possibly shared) accumulator of ``statistic_spec()``, before ``prune``."""
        self.stats = stats

    def add_batch(self, inp: torch.Tensor) -> None:
        """A calibration batch of this Linear's inputs; with a ``statistic``, into an accumulator of its own."""
        spec = self.statistic_spec()
        if spec is None:  # pragma: no cover - interface
            raise NotImplementedError(f"method {self.name!r} declares no statistic and no add_batch")
        if self.stats is None:
            self.stats = make_statistic(spec, self.layer_name)
        self.stats.add_batch(inp, name=self.layer_name)

    def finalized_statistic(self) -> torch.Tensor:
        """``self.stats.finalize()``: H or the activation norms; errors name the Linear when no data came."""
        if self.stats is None or self.stats.nsamples == 0:
            raise ValueError(f"{self.layer_name}: no calibration data reached this layer")
        return self.stats.finalize()

    def prune(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def free(self) -> None:
        """Release calibration statistics."""

    @classmethod
    def cpu_cost(cls, config: SparsityConfig) -> str | None:
        """Rough CPU run time on the default model (SmolLM2-135M, CLI defaults), where it is long."""
        return None


_REGISTRY: dict[str, type[LayerPruner]] = {}


def register_method(name: str) -> Callable[[type[LayerPruner]], type[LayerPruner]]:
    """Class decorator adding a pruner to the registry under ``name``."""

    def deco(cls: type[LayerPruner]) -> type[LayerPruner]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


_COMPOSED: list[Callable[[str], type[LayerPruner]]] = []  # the "METHOD+REFINEMENT" builder (methods.refine)


def register_composed_methods(build: Callable[[str], type[LayerPruner]]) -> None:
    """Set the builder ``get_method`` asks for names with a ``+`` (``methods.refine`` registers it)."""
    _COMPOSED[:] = [build]


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[LayerPruner]:
    """Look up a pruner class; ``"METHOD+REFINEMENT"`` (``"wanda+dsnot"``) is the method followed by a mask
    refinement (``methods.refine``). Unknown names raise with the list of allowed ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        if isinstance(name, str) and "+" in name and _COMPOSED:
            return _COMPOSED[0](name)
        raise ValueError(f"unknown pruning method {name!r}; allowed: {', '.join(available_methods())}") from None


# ------------------------------------------------------------------------------------------ options


class OptionInfo(NamedTuple):
    """One declared option of a method: name, type (as text), default and doc."""

    name: str
    type: str
    default: Any
    doc: str


def _hints(options_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(options_cls)


def type_name(tp: Any) -> str:
    """``int``, ``float | None``, ``'auto' | 'reference'``: a type as a user reads it."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def method_options(method: str | type[LayerPruner]) -> list[OptionInfo]:
    """The options ``method`` declares, in declaration order."""
    cls = get_method(method) if isinstance(method, str) else method
    hints = _hints(cls.Options)
    return [OptionInfo(f.name, type_name(hints[f.name]), f.default, f.metadata.get("doc", ""))
            for f in dataclasses.fields(cls.Options)]


def describe_options(method: str | type[LayerPruner]) -> str:
    """``blocksize (int), percdamp (float), ...``: the allowed options, for error messages."""
    infos = method_options(method)
    return ", ".join(f"{o.name} ({o.type})" for o in infos) if infos else "none"


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(value fits ``tp``, the value to store); ints are accepted (as floats) for floats, bools never for numbers."""
    if tp is Any:
        return True, value
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp) and not isinstance(value, bool), value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, out = _coerce(value, arg)
            if ok:
                return True, out
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    return isinstance(value, origin or tp), value


def _as_dict(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    if isinstance(options, Mapping):
        return dict(options)
    raise ValueError(f"method options must be a mapping of name -> value, got {type(options).__name__}")


def check_options(method: str | type[LayerPruner], options: Any = None) -> Any:
    """The validated, complete ``Options`` of ``method`` (defaults filled in) from a mapping or instance.

    Unknown names and values of the wrong type raise a ``ValueError`` naming them and listing the
    allowed options with their types; an ``Options.validate()`` then checks ranges and choices.
    """
    cls = get_method(method) if isinstance(method, str) else method
    given = _as_dict(options)
    hints = _hints(cls.Options)
    allowed = describe_options(cls)
    values = {}
    for key, value in given.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown option {key!r} for method {cls.name!r}{hint}; allowed: {allowed}")
        ok, out = _coerce(value, hints[key])
        if not ok:
            raise ValueError(f"option {key}={value!r} of method {cls.name!r} is not of type {type_name(hints[key])}"
                             f"; allowed: {allowed}")
        if isinstance(out, float) and not math.isfinite(out):
            raise ValueError(f"option {key}={value!r} of method {cls.name!r} is not finite; allowed: {allowed}")
        values[key] = out
    opts = cls.Options(**values)
    validate = getattr(opts, "validate", None)
    if callable(validate):
        validate()
    return opts


def options_for_report(options: Any) -> dict[str, Any]:
    """Options as JSON-able values: tensors and mappings of them (e.g. gradients) as a short description."""
    out = {}
    for key, value in _as_dict(options).items():
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (torch.dtype, torch.device)):
            out[key] = str(value)
        elif isinstance(value, torch.Tensor):
            out[key] = f"tensor{tuple(value.shape)}"
        elif isinstance(value, Mapping):
            out[key] = f"{type(value).__name__} of {len(value)} entries"
        else:
            out[key] = type(value).__name__
    return out
