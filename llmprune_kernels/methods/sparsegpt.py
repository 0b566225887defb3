"""SparseGPT pruner for the pipeline: the calibration Hessian (``methods.statistics``), then the blocked OBS update."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

from llmprune_kernels.methods.base import LayerPruner, option, register_method
from llmprune_kernels.methods.statistics import StatisticSpec
from llmprune_kernels.ops import sparsegpt as ops
from llmprune_kernels.reference import quant_obs
from llmprune_kernels.sparse24 import quant8


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
    quantize: Literal[quant_obs.QUANTIZE] = option(
        "none", "'fp8' (e4m3) / 'int8': after pruning, round the kept weights to 8 bits with per-row scales and "
                "the OBS error compensation over the same mask (reference.quant_obs); 'none': 16-bit weights")

    def validate(self) -> None:
        if self.blocksize < 1:
            raise ValueError(f"SparseGPT blocksize={self.blocksize} is invalid; allowed: an integer >= 1")
        if not (math.isfinite(self.percdamp) and self.percdamp >= 0):
            raise ValueError(f"SparseGPT percdamp={self.percdamp} is invalid; allowed: a finite number >= 0")
        if self.max_retries < 0:
            raise ValueError(f"SparseGPT max_retries={self.max_retries} is invalid; allowed: an integer >= 0")
        if self.quantize not in quant_obs.QUANTIZE:
            raise ValueError(f"SparseGPT quantize={self.quantize!r} is invalid; allowed: "
                             f"{', '.join(repr(q) for q in quant_obs.QUANTIZE)}")


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
        if o.quantize != "none":
            quant8.check_fp8_device(quant8.weight_dtype_of(o.quantize), layer.weight.device)

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
        weight, quant = res.weight, {}
        if o.quantize != "none":
            t1 = time.perf_counter()
            q = quant_obs.quantize_obs(res.weight, H, res.mask, o.quantize, damp=res.damp, blocksize=o.blocksize,
                                       name=self.layer_name)
            weight = q.weight
            quant = {"sparsegpt_quantize": o.quantize, "sparsegpt_quant_loss": q.loss,
                     "sparsegpt_quant_zeros": q.zeros, "sparsegpt_quant_seconds": time.perf_counter() - t1}
        self.layer.weight.data.copy_(weight)
        return {
            "sparsegpt_loss": res.loss,
            "sparsegpt_damp": res.damp,
            "sparsegpt_damp_retries": res.retries,
            "sparsegpt_backend": used,
            "sparsegpt_tf32": o.tf32,
            "sparsegpt_fast_inverse": res.fast_inverse,
            "sparsegpt_seconds": time.perf_counter() - t0,
            **quant,
        }

    def free(self) -> None:
        self.stats = None
