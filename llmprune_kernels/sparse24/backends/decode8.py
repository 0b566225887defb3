"""The 8-bit 2:4 decode backend ``decode8``: ``y = x @ W.T (+ bias)`` with ``W`` held as FP8 e4m3 / INT8 values,
2:4 metadata and scales (:class:`~llmprune_kernels.sparse24.quant8.Packed24Q8`), for M <= 16.

Decode is bound by reading the weight once: the 8-bit 2:4 weight moves 2.5 bytes per 4 weights against
dense fp16's 8 (0.3125, a 3.2x limit) and 16-bit 2:4's 4.5. The kernel (:mod:`._decode8_kernel`) is the
16-bit ``dot`` / ``dot-swap`` decode kernel with 8-bit values dequantised in registers; fp16 / bf16
activations (fp32 too), fp32 accumulation. Its launch config is measured per weight shape, activation dtype
and power-of-two M on first use (on a per-channel FP8 weight, INT8 where the GPU has no FP8).

Only modules that hold 8-bit weights (:class:`~llmprune_kernels.sparse24.linear8.SparseLinear8`) run it:
``supports`` accepts the 8-bit value dtypes alone, so tuning and dispatch of 16-bit SparseLinears never see it.
Reference: :func:`llmprune_kernels.reference.sparse24_8bit.sparse24_8bit_linear_reference`.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from llmprune_kernels.sparse24.backends._decode_configs import (_INTERPRET, KIND_DOT, KIND_DOT_SWAP, KIND_NAMES,
                                                                KIND_SELECT, _m_class, _norm, config_name, flat_rows,
                                                                launch_config, measure_candidates)
from llmprune_kernels.sparse24.backends._decode_dot import HAS_TRITON
from llmprune_kernels.sparse24.backends.base import Backend
from llmprune_kernels.sparse24.quant8 import QMAX, Packed24Q8, fp8_ok, quantize_24
from llmprune_kernels.testing import random_24_weight

if HAS_TRITON:
    import triton

    from llmprune_kernels.sparse24.backends._decode8_kernel import _sparse24_q8_kernel
    from llmprune_kernels.sparse24.backends._decode8_stream import plan_stream8
    from llmprune_kernels.sparse24.backends._decode_dot import _splitk_reduce_kernel

MAX_M = 16
# (BLOCK_N, BLOCK_K input columns, SPLIT_K, num_warps, num_stages, kind): the 16-bit decode tiles, and BLOCK_K
# 512 / 256 ones that read as many bytes per tile with 1-byte values.
DOT_CONFIGS = [(32, 256, 1, 4, 1, KIND_DOT), (16, 256, 2, 4, 1, KIND_DOT), (32, 256, 4, 4, 1, KIND_DOT),
               (16, 512, 2, 4, 1, KIND_DOT)]
SWAP_CONFIGS = [(64, 128, 4, 4, 1, KIND_DOT_SWAP), (64, 256, 4, 4, 1, KIND_DOT_SWAP), (64, 128, 8, 4, 1, KIND_DOT_SWAP),
                (64, 256, 8, 4, 1, KIND_DOT_SWAP), (128, 128, 2, 8, 1, KIND_DOT_SWAP), (128, 256, 2, 8, 1, KIND_DOT_SWAP)]
CANDIDATES = DOT_CONFIGS + SWAP_CONFIGS
# stream-select (CUDA cores, :mod:`._decode8_stream`): M <= 2 and per-channel scales; BLOCK_K / 8 quads a tile.
STREAM_CONFIGS = [(8, 1024, 1, 4, 1, KIND_SELECT), (16, 1024, 1, 4, 1, KIND_SELECT), (8, 2048, 1, 4, 1, KIND_SELECT),
                  (16, 512, 1, 4, 1, KIND_SELECT), (4, 2048, 1, 2, 1, KIND_SELECT), (32, 1024, 1, 8, 1, KIND_SELECT),
                  (8, 1024, 2, 4, 1, KIND_SELECT)]
STREAM_MAX_M = 2
DEFAULT_CONFIG = (64, 128, 4, 4, 1, KIND_DOT_SWAP)
INTERPRET_CONFIG = (16, 64, 1, 4, 1, KIND_DOT)  # small tiles keep the Triton interpreter quick


def scale_mode(group_size: int | None, block_k: int) -> int:
    """0: one scale per output channel; 1: per group, one per tile (group a multiple of BLOCK_K); 2: per value."""
    if group_size is None:
        return 0
    return 1 if group_size % block_k == 0 else 2


def candidates(m: int, group_size: int | None = None) -> list[tuple]:
    """The configs ``tune_config`` measures for M rows (stream-select only for M <= 2, per-channel scales)."""
    return CANDIDATES + (STREAM_CONFIGS if m <= STREAM_MAX_M and group_size is None else [])


def _plan(q: Packed24Q8, bias: torch.Tensor | None, m: int, config, tuned: bool = False) -> Callable:
    """Bind one launch for ``m`` rows: returns ``run(x2, sx, y)`` for x rows ``sx`` elements apart (unit column
    stride) and a contiguous ``y [m, n]``; what depends on x's dtype is picked per call (two cached dicts).
    ``tuned``: the config comes from the tuning table (measured per shape, dtype and M class on a per-channel
    weight), so a stream-select config meeting a per-group weight runs ``DEFAULT_CONFIG`` instead of raising."""
    bn, bk, split, warps, stages, kind = _norm(config)
    if kind == KIND_SELECT and tuned and (m > STREAM_MAX_M or q.group_size is not None):
        bn, bk, split, warps, stages, kind = DEFAULT_CONFIG
    if kind not in (KIND_DOT, KIND_DOT_SWAP, KIND_SELECT):
        raise ValueError(f"the 8-bit decode kernel runs kinds {KIND_NAMES[KIND_DOT]!r} ({KIND_DOT}), "
                         f"{KIND_NAMES[KIND_DOT_SWAP]!r} ({KIND_DOT_SWAP}) and {KIND_NAMES[KIND_SELECT]!r} "
                         f"({KIND_SELECT}); got kind {kind}")
    if bk % 16 or bk < 16:
        raise ValueError(f"the 8-bit decode kernel needs BLOCK_K to be a multiple of 16, got {bk}")
    n, k = q.shape
    v = q.values.view(torch.uint8) if q.values.dtype == torch.float8_e4m3fn else q.values
    meta, scale = q.meta, q.scale
    on_gpu = v.is_cuda and not _INTERPRET
    kw = {"num_warps": warps, "num_stages": stages} if on_gpu else {}
    if kind == KIND_SELECT:
        return plan_stream8(q, bias, m, bn, bk // 8, split, kw, on_gpu, _splitk_reduce_kernel)
    k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = triton.cdiv(k, k_per_split)  # never launch an empty K slice
    grid = (triton.cdiv(n, bn), triton.cdiv(m, 16), split)
    kern = _sparse24_q8_kernel[grid]
    mode = scale_mode(q.group_size, bk)
    base = dict(SPLIT_K=split, SWAP=kind == KIND_DOT_SWAP, FP8=q.values.dtype == torch.float8_e4m3fn,
                SCALE_MODE=mode, GROUP=q.group_size or 4, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, **kw)
    per_dtype: dict[torch.dtype, dict] = {}

    def consts(dt: torch.dtype) -> dict:
        c = per_dtype.get(dt)
        if c is None:  # fp32 activations, and bf16 under the interpreter (whose bf16 dot is wrong): fp32 math
            ieee = dt == torch.float32 or (dt == torch.bfloat16 and not on_gpu)
            c = per_dtype[dt] = dict(base, IEEE=ieee)
        return c

    has_bias, svn, smn, ssn = bias is not None, v.stride(0), meta.stride(0), scale.stride(0)
    if split == 1:
        b = bias if has_bias else scale

        def run(x2, sx, y):
            kern(x2, v, meta, scale, b, y, m, n, k, k_per_split, sx, svn, smn, ssn, n, 0, HAS_BIAS=has_bias,
                 **consts(x2.dtype))
        return run
    reduce = _splitk_reduce_kernel[(triton.cdiv(m * n, 1024),)]

    def run_split(x2, sx, y):
        part = torch.empty(split, m, n, device=y.device, dtype=torch.float32)
        kern(x2, v, meta, scale, scale, part, m, n, k, k_per_split, sx, svn, smn, ssn, n, m * n, HAS_BIAS=False,
             **consts(x2.dtype))
        reduce(part, bias if has_bias else part, y, m * n, n, SPLIT_K=split, HAS_BIAS=has_bias, BLOCK=1024)
    return run_split


def _check_x(x: torch.Tensor, k: int) -> None:
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features; the 8-bit 2:4 weight has {k}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x dtype {x.dtype} is not supported by the 8-bit decode kernel; allowed: torch.float16, "
                        f"torch.bfloat16, torch.float32")


def decode8_runner(q: Packed24Q8, bias: torch.Tensor | None, m: int, config,
                   tuned: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(x) = x @ W.T (+ bias)`` for inputs of exactly ``m`` rows (any leading shape), launch bound now."""
    n, k = q.shape
    run = _plan(q, bias, m, config, tuned)

    def call(x: torch.Tensor) -> torch.Tensor:
        _check_x(x, k)
        if not x.is_contiguous():
            x = x.contiguous()
        y = x.new_empty((*x.shape[:-1], n))
        run(x, k, y)  # contiguous: rows k apart whatever the leading shape
        return y
    return call


def sparse24_q8_mm(x: torch.Tensor, q: Packed24Q8, bias: torch.Tensor | None = None, block=None) -> torch.Tensor:
    """``x [..., in] @ W.T (+ bias)`` for the 8-bit 2:4 weight ``q``; output in x's dtype.

    ``block=(BLOCK_N, BLOCK_K, SPLIT_K[, num_warps, num_stages[, kind]])`` fixes the tile (kinds ``dot`` 0 and
    ``dot-swap`` 4); otherwise the measured config for this shape and M on a GPU (measured now when new and not
    capturing a CUDA graph), a small fixed tile under the Triton interpreter."""
    if not HAS_TRITON:
        raise RuntimeError("sparse24_q8_mm needs triton; install it or use the reference "
                           "(llmprune_kernels.reference.sparse24_8bit)")
    n, k = q.shape
    _check_x(x, k)
    lead, x2, y = flat_rows(x, k, n)
    m = x2.shape[0]
    if m == 0:
        return y.reshape(*lead, n)
    tuned = block is None
    if tuned:
        block = launch_config(x, n, k, m, _TUNED, tune_config, DEFAULT_CONFIG, INTERPRET_CONFIG)
    _plan(q, bias, m, block, tuned)(x2, x2.stride(0), y)
    return y.reshape(*lead, n)


_TUNED: dict[tuple, tuple] = {}
TUNE_TIMES: dict[tuple, dict[tuple, float]] = {}  # every candidate's time (ms) per tuned key, for reports
TUNE_ERRORS: dict[tuple, str] = {}  # (n, k, dtype, m, config) -> why that candidate could not run


def tune_config(n: int, k: int, dtype: torch.dtype, m: int = 1, device="cuda") -> tuple:
    """Measure every candidate (``triton.testing.do_bench``: L2 flushed before each run, median) on a random
    per-channel 8-bit weight and keep the fastest per (shape, activation dtype, power-of-two M)."""
    key = (n, k, dtype, _m_class(m))
    if key in _TUNED:
        return _TUNED[key]
    m = _m_class(m)
    q = quantize_24(random_24_weight(n, k, torch.float32, device), "fp8" if fp8_ok(device) else "int8")
    x = torch.randn(m, k, device=device, dtype=dtype)
    y = torch.empty(m, n, device=device, dtype=dtype)
    return measure_candidates(key, candidates(m), lambda cfg: functools.partial(_plan(q, None, m, cfg), x, k, y),
                              _TUNED, TUNE_TIMES, TUNE_ERRORS, DEFAULT_CONFIG)


def tuned_config(n: int, k: int, dtype: torch.dtype, m: int) -> tuple | None:
    return _TUNED.get((n, k, dtype, _m_class(m)))


class Decode8Backend(Backend):
    """The Triton 8-bit decode kernel on the 8-bit packing itself (no extra layout); M <= 16."""

    name = "decode8"
    max_m = MAX_M
    quantized = True  # reads the 8-bit packing (Packed24Q8), not the 16-bit one
    eager_substitute = "mmasp8"  # outside CUDA graphs the C++ op's launch costs less host time than Triton's
    traceable = True  # torch.compile traces the op llmprune_kernels::sparse24_mm8 (library.py)
    traced_grad = True  # with the frozen-weight gradient of the dequantised weight

    def available(self, device: torch.device) -> bool:
        return HAS_TRITON and (device.type == "cuda" or _INTERPRET)

    def supports(self, out_features: int, in_features: int, dtype: torch.dtype) -> bool:
        """``dtype``: the weight values' dtype; only 8-bit weights (so 16-bit modules never dispatch here)."""
        return dtype in QMAX

    def usable(self, out_features, in_features, dtype, device) -> bool:
        return super().usable(out_features, in_features, dtype, device) and (
            dtype != torch.float8_e4m3fn or fp8_ok(device))

    def prepare(self, packed, config=None) -> Packed24Q8:
        if not isinstance(packed, Packed24Q8):
            raise ValueError(f"backend 'decode8' runs 8-bit 2:4 weights (SparseLinear8, quantize_24); got a "
                             f"{packed.dtype} 2:4 packing: pick another backend, or sparsify_ with "
                             f"SemiSparseWeightConfig(weight_dtype='fp8' or 'int8')")
        return packed

    def resolve(self, config, out_features, in_features, dtype, m, device, capturing):
        cfg = config or tuned_config(out_features, in_features, dtype, m)
        if cfg is not None:
            return cfg, True
        if device.type != "cuda" or _INTERPRET:
            return INTERPRET_CONFIG, True
        if capturing:  # no timing inside a graph capture: a fixed config, not kept for eager calls
            return DEFAULT_CONFIG, False
        return tune_config(out_features, in_features, dtype, m, device), True

    def install(self, config, out_features, in_features, dtype, m) -> None:
        _TUNED[(out_features, in_features, dtype, _m_class(m))] = _norm(config)

    def bind(self, state: Packed24Q8, config, m, in_features, out_features, bias):
        return decode8_runner(state, bias, m, config)

    def tune(self, states, x, out_features, time_fn):
        """The config ``tune_config`` measured for this shape, dtype and M (kept for later calls too)."""
        m, k = x.shape
        cfg = tune_config(out_features, k, x.dtype, m, x.device)
        return cfg, None, [lambda s=s: self.bind(s, cfg, m, k, out_features, None)(x) for s in states]

    def call(self, state: Packed24Q8, config, x, out_features, bias):
        if torch.compiler.is_compiling():
            return torch.ops.llmprune_kernels.sparse24_mm8(x, state.values, state.meta, state.scale, bias,
                                                           state.shape[1], state.group_size or 0)
        return sparse24_q8_mm(x, state, bias, block=config)

    def describe(self, config) -> str:
        return config_name(config)

    def config_to_json(self, config):
        return list(config)
