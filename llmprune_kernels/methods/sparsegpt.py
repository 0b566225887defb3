"""SparseGPT pruner for the pipeline: the calibration Hessian (``methods.statistics``), then the blocked OBS update."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

from llmprune_kernels.methods.base import LayerPruner, option, register_method
from llmprune_kernels.methods.statistics import StatisticSpec
from llmprune_kernels.ops import sparsegpt as ops


@dataclass(frozen=True)
class SparseGPTOptions:
    """Options of ``sparsegpt`` (defaults: the reference code's)."""

    blocksize: int = option(128, "columns per block of the OBS update (and per mask block, unstructured)")
    percdamp: float = option(0.01, "dampening added to the Hessian diagonal, as a fraction of its mean")
    max_retries: int = option(4, "Cholesky retries, each with 10x the dampening")
    backend: Literal[ops.BACKENDS] = option("auto", "'auto': the C++/CUDA extension where built for the "
                                                    "device, else the reference; 'ext': the extension or an error")
    tf32: bool = option(False, "TF32 for the fp32 GEMMs on CUDA (faster; some mask entries differ, see ops.sparsegpt)")
    fast_inverse: bool | None = option(None, "fp64 inverse-Hessian factor from one factorisation; None: on where "
                                             "the extension runs on CUDA; False: the reference's factor")
    threshold: Literal["exact", "published"] = option(
        "exact", "'exact': exactly floor(numel*s) per block, ties by index; 'published': the original fasterprune's "
                 "score <= sorted[k] per block (k+1 pruned, plus ties; unstructured, runs on the reference)")

    def validate(self) -> None:
        if self.blocksize < 1:
            raise ValueError(f"SparseGPT blocksize={self.blocksize} is invalid; allowed: an integer >= 1")
        if not (math.isfinite(self.percdamp) and self.percdamp >= 0):
            raise ValueError(f"SparseGPT percdamp={self.percdamp} is invalid; allowed: a finite number >= 0")
        if self.max_retries < 0:
            raise ValueError(f"SparseGPT max_retries={self.max_retries} is invalid; allowed: an integer >= 0")


@register_method("sparsegpt")
class SparseGPTPruner(LayerPruner):
    """Blocked OBS update with the calibration Hessian: prune, then correct the rest (Frantar & Alistarh 2023)."""

    Options = SparseGPTOptions
    statistic = "hessian"

    @classmethod
    def cpu_cost(cls, config) -> str | None:
        return "about 8 minutes" if config.is_nm else None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        o, layer = self.options, self.layer
        if o.threshold == "published" and not self.config.is_nm:
            if o.backend == "ext":
                raise ValueError("SparseGPT threshold='published' runs on the reference only; use backend 'auto' "
                                 "or 'reference'")
            self.backend = "reference"
        else:
            self.backend = ops.resolve_backend(o.backend, layer.weight.device, o.blocksize)

    def statistic_spec(self) -> StatisticSpec:
        """The Hessian of this Linear's inputs; fp16/bf16 activations on CUDA go through tensor cores with fp32
        accumulation (``ops.sparsegpt.gram_add_``), fp32 ones through fp32 GEMMs (TF32 with ``tf32``)."""
        layer = self.layer
        return StatisticSpec("hessian", layer.in_features, layer.weight.device, tf32=self.options.tf32)

    def prune(self) -> dict[str, Any]:
        H = self.finalized_statistic()
        o = self.options
        t0 = time.perf_counter()
        res, used = ops.sparsegpt_prune(
            self.layer.weight.data, H, self.config, o.blocksize, o.percdamp, o.max_retries,
            self.backend, o.tf32, self.layer_name, o.fast_inverse, o.threshold,
        )
        self.layer.weight.data.copy_(res.weight)
        return {
            "sparsegpt_loss": res.loss,
            "sparsegpt_damp": res.damp,
            "sparsegpt_damp_retries": res.retries,
            "sparsegpt_backend": used,
            "sparsegpt_tf32": o.tf32,
            "sparsegpt_fast_inverse": res.fast_inverse,
            "sparsegpt_seconds": time.perf_counter() - t0,
        }

    def free(self) -> None:
        self.stats = None
