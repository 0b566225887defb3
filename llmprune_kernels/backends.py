"""Which execution backends are usable in this process, and why not."""
from __future__ import annotations

import importlib.util
import os

import torch

from llmprune_kernels import _ext


def triton_available() -> bool:
    """Triton kernels can run: a CUDA GPU is visible, or the Triton interpreter is on (CPU tensors)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


def backends() -> dict[str, bool]:
    """Report which of ``cpu`` / ``triton`` / ``cuda`` / ``cusparselt`` / ``cutlass_sm90`` are usable.

    * ``cpu``: the compiled C++ CPU ops (``_C``); the plain PyTorch reference always works regardless.
    * ``triton``: Triton kernels (CUDA GPU, or ``TRITON_INTERPRET=1`` on the CPU).
    * ``cuda``: the compiled CUDA ops, with a visible GPU.
    * ``cusparselt``: our cuSPARSELt 2:4 matmul with cached plans, with a visible GPU.
    * ``cutlass_sm90``: CUTLASS's Hopper 2:4 GEMM (built for sm_90a), with an sm_90 GPU.
    """
    gpu = torch.cuda.is_available()
    return {
        "cpu": _ext.HAS_EXT,
        "triton": triton_available(),
        "cuda": _ext.ext_with_cuda() and gpu,
        "cusparselt": _ext.ext_with_cusparselt() and gpu,
        "cutlass_sm90": _ext.ext_with_cutlass_sm90() and gpu and torch.cuda.get_device_capability() == (9, 0),
    }
