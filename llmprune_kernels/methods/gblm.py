"""GBLM-Pruner for the pipeline: Wanda's activation statistics plus a precomputed gradient-norm tensor.

Gradient norms come, in this order of precedence, from the option ``gradient`` (the G tensor of this
Linear), the option ``gradients`` (a mapping, e.g. ``GradientNorms``, keyed by full module name, looked up
by the layer's name), or ``model_info``: the pipeline calls ``prepare_model`` first, which computes them
from the calibration windows (``llmprune_kernels.pipeline.gradients``).

Score and mask: on CUDA (``backend="auto"``) or with ``backend="triton"``, the fused Triton kernel's GBLM
mode (``ops.score_mask``: W and G read once, no score matrix in memory), equal bit for bit to the reference
(``reference.gblm``), which runs elsewhere.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from llmprune_kernels.methods.base import option, register_method
from llmprune_kernels.methods.wanda import BACKENDS, ActNormPruner
from llmprune_kernels.ops.score_mask import score_and_mask, triton_usable
from llmprune_kernels.reference.gblm import gblm_prune_

GRAD_DTYPES = ("float16", "float32", "bfloat16")


@dataclass(frozen=True)
class GBLMOptions:
    """Options of ``gblm``."""

    gblm_scale: float = option(100.0, "gradients are scaled by this before squaring (reference: 100)")
    gblm_grad_dtype: Literal[GRAD_DTYPES] | torch.dtype = option(
        "float16", "dtype the gradient norms are stored in ('float16' as the reference)")
    gblm_accumulate_device: str | torch.device | None = option(
        None, "device of the fp32 gradient accumulator; None: the weights' device ('cpu': as the reference)")
    gradients: Mapping[str, torch.Tensor] | None = option(
        None, "Python API: precomputed gradient norms by module name (skips the gradient pass)")
    gradient: torch.Tensor | None = option(None, "Python API: the gradient norm of this one Linear")
    backend: Literal[BACKENDS] = option("auto", "'auto': the fused Triton kernel on CUDA, else the PyTorch "
                                                "reference; 'triton' runs on CPU only under TRITON_INTERPRET=1")

    def validate(self) -> None:
        if not self.gblm_scale > 0:
            raise ValueError(f"GBLM gblm_scale={self.gblm_scale} is invalid; allowed: a number > 0 (reference: 100)")
        if self.gblm_accumulate_device is not None:
            try:
                torch.device(self.gblm_accumulate_device)
            except RuntimeError:
                raise ValueError(f"GBLM gblm_accumulate_device={self.gblm_accumulate_device!r} is not a device; "
                                 "allowed: e.g. 'cpu', 'cuda', 'cuda:1' or None") from None

    @property
    def store_dtype(self) -> torch.dtype:
        d = self.gblm_grad_dtype
        return getattr(torch, d) if isinstance(d, str) else d


def _lookup_gradient(options: GBLMOptions, name: str, model_info: Any) -> torch.Tensor:
    if options.gradient is not None:
        return options.gradient
    grads = options.gradients if options.gradients is not None else model_info
    if grads is None:
        raise ValueError(
            f"{name}: method 'gblm' needs gradient norms (option 'gradient' or 'gradients'); compute them with "
            "llmprune_kernels.pipeline.gradients.collect_gradient_norms"
        )
    if name not in grads:
        raise ValueError(f"{name}: no gradient norm for this layer; the gradients hold e.g. "
                         f"{next(iter(grads), None)!r}")
    return grads[name]


@register_method("gblm")
class GBLMPruner(ActNormPruner):
    """Wanda's score plus gradient norms from backward passes over the calibration windows (Das et al. 2023).

    Wanda's activation norms, shared like Wanda's; the gradients come from ``model_info``."""

    Options = GBLMOptions

    @classmethod
    def prepare_model(cls, model, calibration, config, *, device=None, options=None, progress=False):
        """Gradient norms over the calibration windows (skipped when the caller passes ``gradients``).

        The backward pass needs the whole model on one device: it is moved to ``device`` for this pass
        and back afterwards.
        """
        options = options if options is not None else GBLMOptions()
        if options.gradients is not None or options.gradient is not None:
            return None
        from llmprune_kernels.pipeline.gradients import collect_gradient_norms

        home = next(model.parameters()).device
        device = torch.device(device or home)
        model.to(device)
        try:
            return collect_gradient_norms(
                model, list(calibration), scale=options.gblm_scale, store_dtype=options.store_dtype,
                accumulate_device=options.gblm_accumulate_device, progress=progress,
            )
        finally:
            model.to(home)

    def prune(self) -> dict[str, Any]:
        name = self.layer_name
        norms = self.finalized_statistic()
        grad = _lookup_gradient(self.options, name, self.model_info)
        weight = self.layer.weight.data
        if self.backend == "triton" and triton_usable(weight.device):
            score_and_mask(weight, norms.to(weight.device), self.config, grad=grad.to(weight.device), inplace=True,
                           mask=False)
        else:
            gblm_prune_(weight, norms.to(weight.device), grad.to(weight.device), self.config)
        return {"backend": self.backend}

    def free(self) -> None:
        self.stats = None
