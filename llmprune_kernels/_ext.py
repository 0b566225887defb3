"""Loads the compiled ``_C`` library once; every op falls back to its reference when it is absent."""
from __future__ import annotations

import logging

import torch  # libtorch symbols must be loaded before _C

logger = logging.getLogger("llmprune_kernels")

try:
    from llmprune_kernels import _C  # type: ignore[attr-defined]

    HAS_EXT = True
    EXT_ERROR: str | None = None
except ImportError as exc:  # not built (LLMPRUNE_SKIP_EXT=1, editable checkout, ABI mismatch)
    _C = None
    HAS_EXT = False
    EXT_ERROR = str(exc)
    logger.warning(
        "llmprune_kernels._C is not available (%s); every op runs through its PyTorch reference path", exc
    )


# What ``_C`` was compiled with, read once: these are asked inside ``SparseLinear.forward``, which
# ``torch.compile`` traces, and dynamo cannot trace a call into the pybind module (only a Python bool).
_WITH_CUDA = HAS_EXT and bool(_C.with_cuda())
_WITH_CUSPARSELT = HAS_EXT and bool(_C.with_cusparselt())
_WITH_CUTLASS_SM90 = HAS_EXT and bool(getattr(_C, "with_cutlass_sm90", lambda: False)())


def ext_with_cuda() -> bool:
    """True when ``_C`` was compiled with its CUDA sources."""
    return _WITH_CUDA


def ext_with_cusparselt() -> bool:
    """True when ``_C`` was compiled with the cuSPARSELt path."""
    return _WITH_CUSPARSELT


def ext_with_cutlass_sm90() -> bool:
    """True when ``_C`` was compiled with the CUTLASS sm90 (wgmma.sp) 2:4 GEMM."""
    return _WITH_CUTLASS_SM90


_CODE_ARCH: dict[int, int] = {}


@torch.compiler.assume_constant_result  # asked in traced forwards: a constant of the process, not a pybind call
def ext_cuda_code_arch(device: int = 0) -> int:
    """``__CUDA_ARCH__`` of ``_C``'s device code as it runs on GPU ``device``: 900 for sm_90 code, 800 for an
    Ampere build (also when its PTX runs on a newer GPU), 0 without a CUDA build or code for that GPU.
    Kernels that need newer code than this (thread-block clusters, wgmma) must not be chosen."""
    if device not in _CODE_ARCH:
        if not _WITH_CUDA:
            _CODE_ARCH[device] = 0
        elif hasattr(_C, "cuda_code_arch"):
            _CODE_ARCH[device] = int(_C.cuda_code_arch(device))
        else:  # a build without the probe: its code was compiled for the GPU it runs on
            major, minor = torch.cuda.get_device_capability(device)
            _CODE_ARCH[device] = 100 * major + 10 * minor
    return _CODE_ARCH[device]
