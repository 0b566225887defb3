"""What can run in this process, in one vocabulary: the compute engines and the registered 2:4 backends."""
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
    """Which engines and 2:4 backends are usable here (the plain-PyTorch reference always is).

    * ``cpp``: the compiled C++ ops of ``_C`` (CPU kernels, e.g. SparseGPT);
    * ``cuda``: ``_C``'s CUDA kernels, with a visible GPU;
    * ``triton``: Triton kernels (a CUDA GPU, or ``TRITON_INTERPRET=1`` on the CPU);
    * one key per registered 2:4 backend (``dense``, ``decode``, ``cusparselt``, ``mmasp``, ``cutlass``, ...):
      whether it can run on the current CUDA device (``dense`` also without one).
    """
    from llmprune_kernels.sparse24 import backends as sparse24_backends

    gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    found = {"cpp": _ext.HAS_EXT, "cuda": _ext.ext_with_cuda() and gpu, "triton": triton_available()}
    for b in sparse24_backends.registered():
        found[b.name] = bool(b.available(device))
    return found
