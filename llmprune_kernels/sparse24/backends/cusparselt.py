"""Python side of the cuSPARSELt 2:4 ops in ``csrc/sparse24/sparse24_cusparselt.cpp``.

The C++ op compresses a weight once and keeps one plan per (shape, dtype, padded M, algorithm) in a
process-wide cache, so an eager call pays only the matmul. This module wraps the ops (schemas and fakes:
:mod:`llmprune_kernels.library`), the search that picks the algorithm, and the backend.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from llmprune_kernels import _ext
from llmprune_kernels.sparse24.backends.base import Backend
from llmprune_kernels.sparse24.pack import Packed24, unpack_24
from llmprune_kernels.validation import check_compressible_24


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


LAYOUTS = range(8)
"""Operand descriptions of the same memory (W, x, y row-major), see the C++ header: 0-3 make W cuSPARSELt's
structured A operand, 4-7 its structured B operand. 0 is torch's own choice."""


def _check_layout(layout: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"cuSPARSELt layout must be one of {list(LAYOUTS)}, got {layout!r}")


def compress(weight: torch.Tensor, layout: int = 0) -> torch.Tensor:
    """cuSPARSELt's compressed form (opaque uint8) of a dense 2:4 CUDA weight, for one operand layout.

    Checked here rather than by the C++ op: a C++ exception raised through the dispatcher can take the
    process down, so the op is only called with valid input.
    """
    _check_layout(layout)
    check_compressible_24(weight, "cuSPARSELt", shape_ok, "out_features % 32 == 0 and in_features % 64 == 0")
    return torch.ops.llmprune_kernels.sparse24_cslt_compress(weight.contiguous(), layout)


def linear(x: torch.Tensor, compressed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
           config: CsltConfig = DEFAULT_CONFIG, layout: int = 0) -> torch.Tensor:
    """``x [M, in] @ W.T (+ bias)`` with the weight compressed for ``layout`` and a cached plan."""
    return torch.ops.llmprune_kernels.sparse24_cslt_linear(
        x, compressed, out_features, bias, config.alg_id, config.split_k, config.split_k_mode, config.split_k_buffers,
        layout,
    )


def max_alg_id(x: torch.Tensor, compressed: torch.Tensor, out_features: int, layout: int = 0) -> int:
    """Highest cuSPARSELt algorithm config id for this problem size."""
    return int(torch.ops.llmprune_kernels.sparse24_cslt_max_alg_id(x, compressed, out_features, layout))


def library_search(x: torch.Tensor, compressed: torch.Tensor, out_features: int, layout: int = 0) -> CsltConfig:
    """cusparseLtMatmulSearch (experimental: it segfaulted with cuSPARSELt 0.8 on H100 for layout 0)."""
    alg, split_k, mode, buffers, _max_alg = torch.ops.llmprune_kernels.sparse24_cslt_search(
        x, compressed, out_features, layout)
    return CsltConfig(int(alg), int(split_k), int(mode) if split_k > 1 else -1, int(buffers) if split_k > 1 else -1)


def search(x: torch.Tensor, compresseds: list[torch.Tensor], out_features: int, time_fn, max_algs: int = 16,
           layout: int = 0) -> tuple[CsltConfig, float, dict[int, float]]:
    """Time algorithm config ids 0..max_algs-1 with ``time_fn(fns)``; return the fastest.

    Capped because high ids are not safe: with cuSPARSELt 0.8 on an H100, id 36 (4096x4096, M=2048)
    raised an illegal-instruction error, which poisons the CUDA context; ids 0..35 ran correctly.

    ``compresseds``: weight copies to cycle through (so the timing reads from HBM like a real model).
    """
    times = {}
    for alg in range(min(max_alg_id(x, compresseds[0], out_features, layout), max_algs - 1) + 1):
        cfg = CsltConfig(alg)
        try:
            times[alg] = time_fn([lambda c=c, cfg=cfg: linear(x, c, out_features, None, cfg, layout)
                                  for c in compresseds])
        except RuntimeError:  # a config that rejects this problem simply does not compete
            continue
    if not times:
        raise RuntimeError(f"no cuSPARSELt algorithm runs {out_features}x{x.shape[1]} at M={x.shape[0]}")
    best = min(times, key=times.get)
    return CsltConfig(best), times[best], times


def plan_count() -> int:
    """Number of cached cuSPARSELt plans in this process (tests check an eager call adds none)."""
    return int(torch.ops.llmprune_kernels.sparse24_cslt_plan_count())


class CusparseltBackend(Backend):
    """Our cached-plan cuSPARSELt op on cuSPARSELt's compressed weight; large M."""

    name = "cusparselt"
    default_priority = 2

    def available(self, device: torch.device) -> bool:
        return device.type == "cuda" and available()

    def supports(self, out_features: int, in_features: int, dtype: torch.dtype) -> bool:
        return shape_ok(out_features, in_features, dtype)

    def prepare(self, packed: Packed24, config=None) -> torch.Tensor:
        return compress(unpack_24(packed))

    def default_config(self, out_features, in_features, dtype, m):
        return DEFAULT_CONFIG

    def bind(self, state, config, m, in_features, out_features, bias):
        op = torch.ops.llmprune_kernels.sparse24_cslt_linear.default
        c = config or DEFAULT_CONFIG
        args = (c.alg_id, c.split_k, c.split_k_mode, c.split_k_buffers)

        def run(x: torch.Tensor) -> torch.Tensor:
            y = op(x.reshape(m, in_features), state, out_features, bias, *args)
            return y if x.dim() == 2 else y.view(*x.shape[:-1], out_features)
        return run

    def call(self, state, config, x, out_features, bias):
        y = linear(x.reshape(-1, x.shape[-1]), state, out_features, bias, config or DEFAULT_CONFIG)
        return y.reshape(*x.shape[:-1], out_features)

    def tune(self, states, x, out_features, time_fn):
        cfg, t, _ = search(x, states, out_features, lambda fns: time_fn(fns, trials=3))
        return cfg, t, [lambda c=c: linear(x, c, out_features, None, cfg) for c in states]

    def config_to_json(self, config):
        return config.as_dict()

    def config_from_json(self, value):
        return CsltConfig(**value)

