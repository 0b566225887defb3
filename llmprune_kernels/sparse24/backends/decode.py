"""Triton 2:4 decode kernels: ``y = x @ W.T (+ bias)`` reading our compressed values and metadata.

Built for small M (decode, M <= 16), where a matmul is bound by reading the weight once: fp16/bf16 2:4
moves 4.5 bytes per 4 weights (2 kept values + one 4-bit index nibble) instead of dense's 8, a 1.78x
limit. Kernels ("kinds", measured per weight shape and M, the fastest is used):

* dot (kind 0): each program owns BLOCK_N output rows and a 1/SPLIT_K slice of K and streams their
  packed weight, expands each tile to dense in registers and feeds ``tl.dot`` (tensor cores) with x
  padded to 16 rows. 16-bit weights are read as one int32 per group (its two kept values) next to the
  group's metadata byte, and integer selects on that pair give each group's dense halves directly;
* dot-swap (kind 4): the same with ``W @ x.T``, so a 64/128-row weight tile is the MMA's M side and
  Hopper's wgmma can run it (split-K supplies the programs);
* stream-select / stream-expand (kinds 2, 3; M <= 16, 16-bit): CUDA-core FMAs, see
  :mod:`llmprune_kernels.sparse24.backends._decode_stream`.

Common to all: whole tiles are loaded without per-column masks (16-byte vectors; the ragged last tile is
a separate masked step) and one tile ahead of the math (register double buffering: Triton's pipeliner
does not overlap loads that feed register math). SPLIT_K > 1 writes fp32 partials that a second small
kernel sums in a fixed order (deterministic, unlike atomics). Larger M runs correctly with a second grid
axis, but cuSPARSELt or dense win there (see SparseLinear dispatch).
Reference: :func:`llmprune_kernels.reference.sparse24_matmul.sparse24_linear_reference`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from llmprune_kernels.sparse24.backends._decode_configs import (  # noqa: F401  (the configs are part of this API)
    _INTERPRET,
    DEFAULT_CONFIG,
    DOT_CONFIGS,
    KIND_DOT,
    KIND_DOT_SWAP,
    KIND_EXPAND,
    KIND_NAMES,
    KIND_SELECT,
    STREAM_CONFIGS,
    STREAM_TUNE_MAX_M,
    SWAP_CONFIGS,
    _m_class,
    _norm,
    candidates,
    config_name,
    flat_rows,
    launch_config,
    measure_candidates,
)
from llmprune_kernels.sparse24.backends._decode_dot import HAS_TRITON
from llmprune_kernels.sparse24.backends._decode_stream import as_pairs, plan_stream
from llmprune_kernels.sparse24.backends.base import Backend
from llmprune_kernels.sparse24.pack import Packed24, pack_24
from llmprune_kernels.testing import random_24_weight

if HAS_TRITON:
    import triton

    from llmprune_kernels.sparse24.backends._decode_dot import _sparse24_mm_kernel, _splitk_reduce_kernel


def _plan(values, meta, bias, m, n, k, config):
    """Bind one decode launch for ``m`` rows: returns ``run(x, sx, y)`` for x rows ``sx`` elements apart
    (unit column stride) and a contiguous ``y [m, n]``. Everything else is resolved here once
    (``decode_runner`` keeps the plan, so an eager call only allocates y and launches)."""
    bn, bk, split, warps, stages, kind = _norm(config)
    kw = {} if (_INTERPRET or not values.is_cuda) else {"num_warps": warps, "num_stages": stages}
    if kind in (KIND_SELECT, KIND_EXPAND):
        return plan_stream(values, meta, bias, m, n, k, bn, bk // 4, split, kind == KIND_EXPAND, kw,
                           _splitk_reduce_kernel)
    if kind not in (KIND_DOT, KIND_DOT_SWAP):
        raise ValueError(f"decode kernel kind {kind} is unknown; allowed: {KIND_NAMES}")
    if bk % 16 or bk < 16:
        raise ValueError(f"the dot kernels need BLOCK_K to be a multiple of 16, got {bk}")
    block_m = 16
    ieee = values.dtype == torch.float32 or (values.dtype == torch.bfloat16 and not values.is_cuda)
    pairs = values.element_size() == 2
    v = as_pairs(values) if pairs else values
    k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = triton.cdiv(k, k_per_split)  # never launch an empty K slice
    grid = (triton.cdiv(n, bn), triton.cdiv(m, block_m), split)
    kern = _sparse24_mm_kernel[grid]
    common = dict(IEEE=ieee, PAIRS=pairs, SWAP=kind == KIND_DOT_SWAP, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, **kw)
    has_bias, svn, smn = bias is not None, v.stride(0), meta.stride(0)
    if split == 1:
        b = bias if has_bias else values

        def run(x2, sx, y):
            kern(x2, v, meta, b, y, m, n, k, k_per_split, sx, svn, smn, n, 0, HAS_BIAS=has_bias, SPLIT_K=1, **common)
        return run
    reduce = _splitk_reduce_kernel[(triton.cdiv(m * n, 1024),)]

    def run_split(x2, sx, y):
        part = torch.empty(split, m, n, device=y.device, dtype=torch.float32)
        kern(x2, v, meta, values, part, m, n, k, k_per_split, sx, svn, smn, n, m * n,
             HAS_BIAS=False, SPLIT_K=split, **common)
        reduce(part, bias if has_bias else part, y, m * n, n, SPLIT_K=split, HAS_BIAS=has_bias, BLOCK=1024)
    return run_split


def _launch(x2, values, meta, bias, y, m, n, k, config):
    _plan(values, meta, bias, m, n, k, config)(x2, x2.stride(0), y)


_TUNED: dict[tuple, tuple] = {}
TUNE_TIMES: dict[tuple, dict[tuple, float]] = {}  # every candidate's time (ms) per tuned key, for reports
TUNE_ERRORS: dict[tuple, str] = {}  # (n, k, dtype, m, config) -> why that candidate could not run


def tune_config(n: int, k: int, dtype: torch.dtype, m: int = 1, device="cuda") -> tuple:
    """Measure every candidate config (L2 flushed before each run, median of triton.testing.do_bench) and
    cache the fastest per (shape, dtype, power-of-two M); all times are kept in ``TUNE_TIMES``."""
    key = (n, k, dtype, _m_class(m))
    if key in _TUNED:
        return _TUNED[key]
    m = _m_class(m)
    p = pack_24(random_24_weight(n, k, dtype, device))
    x = torch.randn(m, k, device=device, dtype=dtype)
    y = torch.empty(m, n, device=device, dtype=dtype)
    return measure_candidates(key, candidates(m, dtype),
                              lambda cfg: lambda: _launch(x, p.values, p.meta, None, y, m, n, k, cfg),
                              _TUNED, TUNE_TIMES, TUNE_ERRORS, DEFAULT_CONFIG)


def tuned_config(n: int, k: int, dtype: torch.dtype, m: int) -> tuple | None:
    """The config measured for this shape and M (None if not tuned in this process)."""
    return _TUNED.get((n, k, dtype, _m_class(m)))


def set_tuned_config(n: int, k: int, dtype: torch.dtype, m: int, config) -> None:
    """Install a config (e.g. from a saved tuning table) so calls do not re-measure."""
    _TUNED[(n, k, dtype, _m_class(m))] = _norm(config)


def decode_runner(values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None, m: int, in_features: int,
                  config) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(x) = x @ W.T (+ bias)`` for inputs of exactly ``m`` rows (any leading shape), with every launch
    argument bound now: SparseLinear's eager path keeps one per M so a call only checks the input's dtype
    and layout, allocates the output and launches."""
    n, k, dt = values.shape[0], in_features, values.dtype
    run = _plan(values, meta, bias, m, n, k, config)

    def call(x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not dt:
            raise TypeError(f"x dtype {x.dtype} differs from the weight dtype {dt}")
        if not x.is_contiguous():
            x = x.contiguous()
        y = x.new_empty((*x.shape[:-1], n))
        run(x, k, y)  # contiguous: rows k apart whatever the leading shape
        return y
    return call


def sparse24_mm(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
    in_features: int | None = None, block: tuple | None = None,
) -> torch.Tensor:
    """``x [..., in] @ W.T (+ bias)`` for the packed 2:4 weight ``(values [out, in/2], meta)``.

    ``block=(BLOCK_N, BLOCK_K, SPLIT_K[, num_warps, num_stages[, kind]])`` fixes the kernel and tile
    (``KIND_NAMES``; BLOCK_K in input columns); otherwise the measured config for this shape and M is used
    on a GPU (measured now if new and not capturing a CUDA graph) and a small fixed dot tile under the
    Triton interpreter.
    """
    if not HAS_TRITON:
        raise RuntimeError("sparse24_mm needs triton; install it or use SparseLinear's dense / reference path")
    n = values.shape[0]
    k = in_features if in_features is not None else values.shape[1] * 2
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features; the packed weight has {k}")
    if x.dtype != values.dtype:
        raise TypeError(f"x dtype {x.dtype} differs from the weight dtype {values.dtype}")
    lead, x2, y = flat_rows(x, k, n)
    m = x2.shape[0]
    if m == 0:
        return y.reshape(*lead, n)
    if block is None:
        block = launch_config(x, n, k, m, _TUNED, tune_config, DEFAULT_CONFIG, (16, 64, 1))
    _launch(x2, values, meta, bias, y, m, n, k, block)
    return y.reshape(*lead, n)


DECODE_MAX_M = 64  # tuning measures the decode kernels up to here; they are designed for M <= 16


class DecodeBackend(Backend):
    """The Triton decode kernels on the packed weight itself (no extra layout); small M."""

    name = "decode"
    tune_max_m = DECODE_MAX_M
    traced_grad = True  # the op llmprune_kernels::sparse24_mm has the frozen-weight gradient
    default_priority, default_max_m = 1, 16
    # a Triton launch costs more host time than it saves on a small layer outside a CUDA graph (H100: 0.4-0.7x
    # of dense per eager call at 4096x4096), while the C++ mma.sp op launches like F.linear
    eager_substitute = "mmasp"

    def available(self, device: torch.device) -> bool:
        return HAS_TRITON and (device.type == "cuda" or _INTERPRET)  # the interpreter runs it on CPU tensors

    def supports(self, out_features: int, in_features: int, dtype: torch.dtype) -> bool:
        return True

    def resolve(self, config, out_features, in_features, dtype, m, device, capturing):
        cfg = config or tuned_config(out_features, in_features, dtype, m)
        if cfg is not None:
            return cfg, True
        if capturing:  # no timing inside a graph capture: a fixed config, not kept for eager calls
            return DEFAULT_CONFIG, False
        return tune_config(out_features, in_features, dtype, m, device), True

    def install(self, config, out_features, in_features, dtype, m) -> None:
        set_tuned_config(out_features, in_features, dtype, m, config)

    def bind(self, state: Packed24, config, m, in_features, out_features, bias):
        return decode_runner(state.values, state.meta, bias, m, in_features, config)

    def call(self, state: Packed24, config, x, out_features, bias):
        if torch.compiler.is_compiling():
            return torch.ops.llmprune_kernels.sparse24_mm(x, state.values, state.meta, bias, state.shape[1])
        return sparse24_mm(x, state.values, state.meta, bias, state.shape[1], block=config)

    def tune(self, states, x, out_features, time_fn):
        m, k = x.shape
        cfg = tune_config(out_features, k, x.dtype, m, x.device)
        return cfg, None, [lambda p=p: sparse24_mm(x, p.values, p.meta, None, k, block=cfg) for p in states]

    def describe(self, config) -> str:
        return config_name(config)

    def config_to_json(self, config):
        return list(config)

