"""Python side of the CUTLASS sm90 2:4 GEMM in ``csrc/sparse24/cutlass_sm90`` (wgmma.sp, TMA, persistent).

cuSPARSELt 0.8's bf16 kernels are barely faster than dense on the H100 at large M (1.03-1.16x where its
fp16 kernels reach 1.40-1.49x); CUTLASS 3's Hopper sparse GEMM runs both dtypes on the same
instructions. The weight is compressed once into CUTLASS's values + metadata; a call builds TMA
descriptors on the host and launches one kernel, so it is safe in eager mode and in CUDA graphs. Built
only when CUTLASS headers were found at build time (``pip install nvidia-cutlass``) for sm_90a.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from llmprune_kernels import _ext

CONFIGS = (0, 1, 2)
"""Tile configs (out x tokens x K, cluster): 0 = 128x128x64 2x1, 1 = 128x256x64 1x2, 2 = 256x128x64 2x1."""
MIN_M = 64
"""Tuning measures this path from this many input rows up (below, the mma.sp and decode kernels win)."""


class CutlassWeight(NamedTuple):
    """A 2:4 weight in CUTLASS's sm90 compressed form (values with CUTLASS's padding, metadata bytes)."""

    values: torch.Tensor
    meta: torch.Tensor

    def nbytes(self) -> int:
        return self.values.nbytes + self.meta.nbytes


def available(device: torch.device | int | None = None) -> bool:
    """The CUTLASS ops were compiled in, the GPU is sm_90 and LLMPRUNE_NO_CUTLASS is not set."""
    if os.environ.get("LLMPRUNE_NO_CUTLASS", "0") == "1":
        return False
    if not (_ext.ext_with_cutlass_sm90() and torch.cuda.is_available()):
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


def shape_ok(out_features: int, in_features: int, dtype: torch.dtype) -> bool:
    """fp16 / bf16 weights with out % 8 == 0 and in % 16 == 0 (TMA's 16-byte alignment of every operand)."""
    return dtype in (torch.float16, torch.bfloat16) and out_features % 8 == 0 and in_features % 16 == 0


def _check_config(config: int) -> int:
    if config not in CONFIGS:
        raise ValueError(f"CUTLASS 2:4 tile config must be one of {list(CONFIGS)}, got {config!r}")
    return int(config)


def compress(weight: torch.Tensor) -> CutlassWeight:
    """Compress a dense 2:4 CUDA weight ``[out, in]`` (fp16 / bf16). The caller has checked the 2:4
    pattern (``pack_24`` does); the compressor keeps the first two nonzeros of every group of four."""
    if weight.dim() != 2 or not weight.is_cuda:
        raise ValueError(f"CUTLASS 2:4 compress needs a 2-D CUDA weight, got shape {tuple(weight.shape)} on {weight.device}")
    if weight.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"CUTLASS 2:4 needs float16 or bfloat16 weights, got {weight.dtype}")
    if not shape_ok(*weight.shape, weight.dtype):
        raise ValueError(f"CUTLASS 2:4 needs out_features % 8 == 0 and in_features % 16 == 0, got {tuple(weight.shape)}")
    values, meta = torch.ops.llmprune_kernels.sparse24_cutlass_compress(weight.contiguous())
    return CutlassWeight(values, meta)


def linear(x: torch.Tensor, weight: CutlassWeight, out_features: int, bias: torch.Tensor | None = None,
           config: int = 0) -> torch.Tensor:
    """``x [M, in] @ W.T (+ bias)`` for a weight from :func:`compress`."""
    config = _check_config(config)
    return torch.ops.llmprune_kernels.sparse24_cutlass_linear(x, weight.values, weight.meta, out_features, bias, config)


def search(x: torch.Tensor, weights: list[CutlassWeight], out_features: int, time_fn) -> tuple[int, float, dict]:
    """Time every tile config with ``time_fn(fns)`` (cycling through ``weights``); return the fastest."""
    times = {}
    for cfg in CONFIGS:
        try:
            times[cfg] = time_fn([lambda w=w, c=cfg: linear(x, w, out_features, None, c) for w in weights])
        except RuntimeError:  # a config that cannot run this problem does not compete
            continue
    if not times:
        raise RuntimeError(f"no CUTLASS 2:4 config runs {out_features}x{x.shape[1]} at M={x.shape[0]}")
    best = min(times, key=times.get)
    return best, times[best], times


if _ext.ext_with_cutlass_sm90():
    @torch.library.register_fake("llmprune_kernels::sparse24_cutlass_linear")
    def _linear_fake(x, values, meta, out_features, bias=None, config=0):
        return x.new_empty(x.shape[0], out_features)
