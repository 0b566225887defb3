"""Launch configs of the Triton 2:4 decode kernels (:mod:`llmprune_kernels.sparse24.backends.decode`): the
candidate tables and their names. ``decode.tune_config`` measures them per weight shape, dtype and
power-of-two M."""
from __future__ import annotations

import os
from collections.abc import Callable

import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Decode kernels ("kinds"); a config is (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, kind), BLOCK_K in
# input columns for every kind.
KIND_DOT, KIND_SELECT, KIND_EXPAND, KIND_DOT_SWAP = 0, 2, 3, 4
KIND_NAMES = {KIND_DOT: "dot", KIND_SELECT: "stream-select", KIND_EXPAND: "stream-expand", KIND_DOT_SWAP: "dot-swap"}
# Candidates, measured per weight shape and M on first use. dot: x @ W.T on tensor cores (mma.sync),
# any M and dtype. dot-swap: W @ x.T, so a 64/128-row weight tile is the MMA's M side (Hopper wgmma);
# split-K gives it enough programs. stream-select (CUDA cores, 16-bit weights) is measured for M <= 2:
# above that its FMAs need more issue slots per weight group than the HBM stream leaves; stream-expand
# (kind 3) runs any M <= 16 but is not measured: its main loop never beats dot-swap's. Main-loop SASS per
# weight group and candidate, compiled for sm_90 (Triton 3.6): select ~23 at M=1, ~30 at M=2; dot-swap 22-25;
# dot 36-46; expand 43-67.
DOT_CONFIGS = [(32, 256, 1, 4, 1, 0), (16, 256, 2, 4, 1, 0), (32, 256, 4, 4, 1, 0)]
SWAP_CONFIGS = [
    (64, 128, 4, 4, 1, 4), (64, 64, 4, 4, 1, 4), (64, 128, 8, 4, 1, 4), (128, 128, 2, 8, 1, 4), (128, 64, 4, 8, 1, 4),
]
STREAM_CONFIGS = [(8, 1024, 1, 4, 1, 2), (16, 512, 1, 4, 1, 2), (4, 1024, 1, 2, 1, 2), (16, 1024, 1, 8, 1, 2),
                  (8, 1024, 2, 4, 1, 2)]
STREAM_TUNE_MAX_M = 2
DEFAULT_CONFIG = (16, 256, 2, 4, 1, 0)


def candidates(m: int, dtype: torch.dtype) -> list[tuple]:
    """The configs ``tune_config`` measures for M rows of ``dtype``."""
    cands = list(DOT_CONFIGS) + list(SWAP_CONFIGS)
    if dtype in (torch.float16, torch.bfloat16) and m <= STREAM_TUNE_MAX_M:
        cands += STREAM_CONFIGS
    return cands


def config_name(config) -> str:
    """A readable label, e.g. ``stream-select bn8 bk1024 s1 w4``."""
    bn, bk, split, warps, _, kind = _norm(config)
    return f"{KIND_NAMES.get(kind, kind)} bn{bn} bk{bk} s{split} w{warps}"


def _m_class(m: int) -> int:
    """Decode configs are tuned per power-of-two M (the dispatch buckets)."""
    return 1 << max(0, m - 1).bit_length()


def _norm(config) -> tuple:
    c = tuple(int(v) for v in config)
    if len(c) == 2:
        c = c + (1,)
    if len(c) == 3:
        c = c + (4, 1)
    if len(c) == 5:
        c = c + (0,)
    return c


def measure_candidates(key: tuple, configs, make_run: Callable, tuned: dict, times_out: dict, errors_out: dict,
                       default: tuple) -> tuple:
    """Time each config's run (``make_run(cfg)`` builds it once; ``triton.testing.do_bench``: L2 flushed
    before each run, median) and keep the fastest as ``tuned[key]`` (``default`` if none ran); every time
    goes to ``times_out[key]`` and each config that could not run (out of shared memory or registers for
    this shape) to ``errors_out``."""
    import triton

    times = {}
    for cfg in configs:
        try:
            times[cfg] = triton.testing.do_bench(make_run(cfg), warmup=5, rep=25, return_mode="median")
        except Exception as exc:  # does not compete; kept for reports
            errors_out[(*key, cfg)] = f"{type(exc).__name__}: {exc}"[:300]
    times_out[key] = times
    tuned[key] = min(times, key=times.get) if times else default
    return tuned[key]


def launch_config(x: torch.Tensor, n: int, k: int, m: int, tuned: dict, tune: Callable, default: tuple,
                  interpret: tuple) -> tuple:
    """The config of a call that fixes none: ``interpret`` (small tiles) under the Triton interpreter or off
    CUDA; else the one measured for (shape, dtype, M class), measured now by ``tune`` when new, ``default``
    while a CUDA graph is being captured (no timing there)."""
    if _INTERPRET or not x.is_cuda:
        return interpret
    block = tuned.get((n, k, x.dtype, _m_class(m)))
    if block is None:
        block = default if torch.cuda.is_current_stream_capturing() else tune(n, k, x.dtype, m, x.device)
    return block


def flat_rows(x: torch.Tensor, k: int, n: int) -> tuple[tuple, torch.Tensor, torch.Tensor]:
    """``x [..., k]`` as unit-stride rows ``x2 [m, k]``, its leading shape, and the output ``y [m, n]``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return lead, x2, torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
