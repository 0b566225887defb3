"""Host time per eager call of the 2:4 library ops against ``F.linear`` (the GPU kept busy meanwhile).

The seventh session's e2e prefill (eager, 2048 tokens) fell from 1.14x to 0.85x of dense when the
tuning table moved the 4096-wide fp16 layers from cuSPARSELt to CUTLASS, though the same kernels were
1.42-1.44x in CUDA graphs: a host-bound eager call would do that. For each op this enqueues 200 calls
behind a long GPU sleep (so the GPU never waits for the host) and reports host microseconds per call,
then the eager time per call with the GPU in the loop (200 calls, events). One JSON line per case.
Usage: python benchmarks/diag_cutlass_host.py
"""
from __future__ import annotations

import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmprune_kernels.sparse24 import SparseLinear
from llmprune_kernels.sparse24.backends import cusparselt as cslt
from llmprune_kernels.sparse24.backends import cutlass_sm90 as ctl
from llmprune_kernels.sparse24 import dispatch


def host_us(fn, n: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU spin: every call below is only enqueued
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dt / n * 1e6


def eager_us(fn, n: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / n * 1e3


def main() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        for out_f, in_f in ((4096, 4096), (4096, 11008)):
            w = random_24_weight(out_f, in_f, dtype, "cuda")
            lin = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=dtype)
            lin.weight.data = w
            sl = SparseLinear.from_linear(lin)
            comp = cslt.compress(w)
            for m in (64, 2048):
                x = torch.randn(m, in_f, device="cuda", dtype=dtype)
                fns = {"F.linear": lambda: F.linear(x, w), "cusparselt": lambda: cslt.linear(x, comp, out_f)}
                for cfg in (4, 9):  # 256x128 with K steps 64 and 128, 1x2 cluster
                    cw = sl._cutlass(ctl.format_of(cfg))
                    op = torch.ops.llmprune_kernels.sparse24_cutlass_linear.default
                    fns[f"cutlass_op cfg {cfg}"] = lambda cw=cw, cfg=cfg: op(x, cw.values, cw.meta, out_f, None, cfg)
                    fns[f"cutlass.linear cfg {cfg}"] = lambda cw=cw, cfg=cfg: ctl.linear(x, cw, out_f, None, cfg)
                with torch.no_grad():
                    res = {name: {"host_us": round(host_us(fn), 1), "eager_us": round(eager_us(fn), 1)}
                           for name, fn in fns.items()}
                print(json.dumps({"shape": [out_f, in_f], "dtype": str(dtype), "m": m, "per_call": res}), flush=True)


if __name__ == "__main__":
    main()
