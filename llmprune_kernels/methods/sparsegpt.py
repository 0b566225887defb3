"""SparseGPT pruner for the pipeline: running Hessian from a forward hook, then the blocked OBS update.

Options: ``blocksize`` (128), ``percdamp`` (0.01), ``max_retries`` (4, Cholesky retries with 10x damping),
``backend`` ("auto": the C++/CUDA extension when built for the layer's device, else the reference;
"reference"; "ext"), ``tf32`` (False; see ``ops.sparsegpt`` for its tolerance), ``fast_inverse`` (None = on
where the extension runs on CUDA; False = the reference's bit-identical factor; see
``ops.sparsegpt.sparsegpt_prune``), ``layer_name`` (for errors).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from llmprune_kernels.methods.base import LayerPruner, register_method
from llmprune_kernels.ops import sparsegpt as ops


@register_method("sparsegpt")
class SparseGPTPruner(LayerPruner):
    def __init__(self, layer, config, **options: Any) -> None:
        super().__init__(layer, config, **options)
        self.name = options.get("layer_name", "layer")
        self.blocksize = int(options.get("blocksize", 128))
        self.percdamp = float(options.get("percdamp", 0.01))
        self.max_retries = int(options.get("max_retries", 4))
        self.tf32 = bool(options.get("tf32", False))
        fast = options.get("fast_inverse")
        self.fast_inverse = None if fast is None else bool(fast)
        self.backend = ops.resolve_backend(options.get("backend", "auto"), layer.weight.device, self.blocksize)
        n = layer.in_features
        self.H = torch.zeros(n, n, dtype=torch.float32, device=layer.weight.device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        self.nsamples = ops.hessian_add_batch(self.H, self.nsamples, inp.detach(), self.backend, self.tf32,
                                              name=f"{self.name} input activations")

    def prune(self) -> dict[str, Any]:
        if self.nsamples == 0:
            raise ValueError(f"{self.name}: no calibration data reached this layer")
        t0 = time.perf_counter()
        res, used = ops.sparsegpt_prune(
            self.layer.weight.data, self.H, self.config, self.blocksize, self.percdamp, self.max_retries,
            self.backend, self.tf32, self.name, self.fast_inverse,
        )
        self.layer.weight.data.copy_(res.weight)
        return {
            "sparsegpt_loss": res.loss,
            "sparsegpt_damp": res.damp,
            "sparsegpt_damp_retries": res.retries,
            "sparsegpt_backend": used,
            "sparsegpt_tf32": self.tf32,
            "sparsegpt_fast_inverse": res.fast_inverse,
            "sparsegpt_seconds": time.perf_counter() - t0,
        }

    def free(self) -> None:
        self.H = None
