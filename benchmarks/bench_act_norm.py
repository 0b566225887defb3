"""Activation statistics (``ops.act_norm.act_norm_update_``, Wanda's running mean of squared input-channel
norms) against one read of the activations and the reference, timed in the same run.

Cases: tokens x width of calibration activations at LLaMA-7B widths (2048 x 4096, 2048 x 11008,
8192 x 4096, 2048 x 28672), fp16. Cold activations: every timed function cycles through copies holding
more than twice the L2 cache. Baselines, each measured in the same process:
* ``read_once``: ``x.sum(0)`` in a CUDA graph, one read of the activations (the kernel's floor), and
  ``x.clone()`` (a read and a write) for scale; ``kernel_over_read_once`` = kernel / read_once.
* ``reference``: ``reference.wanda.ActNormStats.add_batch`` (eager); ``speedup_vs_reference`` = reference /
  the kernel called eagerly the same way (``kernel_eager``).
The kernel's statistics are checked against the reference's (fp32 rounding) first.
Results: ``results/act_norm.json``.
"""
from __future__ import annotations

import pytest
import torch

from conftest import QUICK, Results, cold_copies, l2_bytes, ratio, replayer, requires_cuda, synced, time_interleaved
from llmprune_kernels.ops.act_norm import TritonActNormStats, act_norm_update_
from llmprune_kernels.reference.wanda import ActNormStats

pytestmark = requires_cuda

SHAPES = [(2048, 4096), (2048, 11008), (8192, 4096), (2048, 28672)]
TRIALS = 5 if QUICK else 9


@pytest.fixture(scope="module")
def results(env):
    return Results("act_norm", __doc__, env)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_act_norm(benchmark, results, shape):
    tokens, width = shape
    x_bytes = tokens * width * 2
    n = cold_copies(x_bytes)
    torch.manual_seed(0)
    xs = [torch.randn(tokens, width, device="cuda", dtype=torch.float16) for _ in range(n)]
    stats, ref = TritonActNormStats(width, device="cuda"), ActNormStats(width, device="cuda")
    stats.add_batch(xs[0][None])
    ref.add_batch(xs[0][None])
    torch.testing.assert_close(stats.scaler_row, ref.scaler_row, rtol=2e-6, atol=0)
    t = time_interleaved({
        "kernel": replayer([lambda x=x: act_norm_update_(stats, x, check=False) for x in xs]),
        "read_once": replayer([lambda x=x: x.sum(0) for x in xs]),
        "clone": replayer([lambda x=x: x.clone() for x in xs]),
    }, TRIALS)
    t.update(time_interleaved({
        "kernel_eager": replayer([lambda x=x: act_norm_update_(stats, x, check=False) for x in xs], graph=False),
        "kernel_checked_eager": replayer([lambda x=x: act_norm_update_(stats, x) for x in xs], graph=False),
        "reference": replayer([lambda x=x: ref.add_batch(x) for x in xs], graph=False),
    }, 3 if QUICK else 5))
    gbytes = x_bytes / 1e9
    fig = {
        "case": f"{tokens}x{width} float16", "shape": [tokens, width], "dtype": "float16", "activations": "cold",
        "copies": n, "activation_bytes": x_bytes, "l2_bytes": l2_bytes(), "times_ms": t, "baseline": "read_once",
        "ratios": {"kernel_over_read_once": ratio(t["kernel"], t["read_once"]),
                   "kernel_over_clone": ratio(t["kernel"], t["clone"]),
                   "speedup_vs_reference": ratio(t["reference"], t["kernel_eager"]),
                   "checked_eager_over_eager": ratio(t["kernel_checked_eager"], t["kernel_eager"])},
        "kernel_GBps": gbytes / (t["kernel"] / 1e3), "read_once_GBps": gbytes / (t["read_once"] / 1e3),
    }
    results.add(fig)
    benchmark.extra_info.update(fig)
    benchmark.pedantic(synced(lambda: act_norm_update_(stats, xs[0], check=False)), rounds=20, warmup_rounds=2)
