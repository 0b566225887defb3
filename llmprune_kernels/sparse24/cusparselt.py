"""Python side of the cuSPARSELt 2:4 ops in ``csrc/sparse24/sparse24_cusparselt.cpp``.

The C++ op compresses a weight once and keeps one plan per (shape, dtype, padded M, algorithm) in a
process-wide cache, so an eager call pays only the matmul. This module registers the fake (meta)
implementation that torch.compile needs and wraps the search that picks the algorithm.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from llmprune_kernels import _ext


def available() -> bool:
    """Our cuSPARSELt ops were compiled in and a GPU is visible."""
    return _ext.ext_with_cusparselt() and torch.cuda.is_available()


def shape_ok(out_features: int, in_features: int, dtype: torch.dtype) -> bool:
    """cuSPARSELt 2:4 runs fp16 / bf16 weights with out % 32 == 0 and in % 64 == 0 (checked in C++ too)."""
    return dtype in (torch.float16, torch.bfloat16) and out_features % 32 == 0 and in_features % 64 == 0


@dataclass(frozen=True)
class CsltConfig:
    """An algorithm choice from cusparseLtMatmulSearch (-1 = library default)."""

    alg_id: int = -1
    split_k: int = -1
    split_k_mode: int = -1
    split_k_buffers: int = -1

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULT_CONFIG = CsltConfig()


def compress(weight: torch.Tensor) -> torch.Tensor:
    """cuSPARSELt's compressed form (opaque uint8) of a dense 2:4 CUDA weight."""
    return torch.ops.llmprune_kernels.sparse24_cslt_compress(weight.contiguous())


def linear(x: torch.Tensor, compressed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
           config: CsltConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """``x [M, in] @ W.T (+ bias)`` with the compressed weight and a cached plan."""
    return torch.ops.llmprune_kernels.sparse24_cslt_linear(
        x, compressed, out_features, bias, config.alg_id, config.split_k, config.split_k_mode, config.split_k_buffers
    )


def search(x: torch.Tensor, compressed: torch.Tensor, out_features: int) -> CsltConfig:
    """Run cusparseLtMatmulSearch for this M (times every algorithm; synchronises, never in a graph)."""
    alg, split_k, mode, buffers, _max_alg = torch.ops.llmprune_kernels.sparse24_cslt_search(x, compressed, out_features)
    return CsltConfig(int(alg), int(split_k), int(mode) if split_k > 1 else -1, int(buffers) if split_k > 1 else -1)


def plan_count() -> int:
    """Number of cached cuSPARSELt plans in this process (tests check an eager call adds none)."""
    return int(torch.ops.llmprune_kernels.sparse24_cslt_plan_count())


if _ext.ext_with_cusparselt():
    @torch.library.register_fake("llmprune_kernels::sparse24_cslt_linear")
    def _linear_fake(x, compressed, out_features, bias=None, alg_id=-1, split_k=-1, split_k_mode=-1,
                     split_k_buffers=-1):
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("llmprune_kernels::sparse24_cslt_compress")
    def _compress_fake(weight):
        # The real size is library-defined; compile never traces compression (done at load time).
        return weight.new_empty(weight.numel() * weight.element_size() * 9 // 16, dtype=torch.uint8)
