"""Launch target for Nsight Compute: ``SparseLinear`` pinned to one 2:4 backend (or dense ``F.linear``) at one
shape, dtype and M; warm-up calls, then ``--calls`` calls inside the NVTX range ``sparse24``.

    ncu --nvtx --nvtx-include "sparse24/" --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section WarpStateStats python tools/ncu_sparse24.py --path mmasp --shape 4096x4096 --m 16

``--path``: dense, decode, mmasp, cusparselt or cutlass (``SparseLinear.force_path``); ``--dtype`` float16 or
bfloat16. Without a profiler it prints the CUDA-graph time per call against dense on the same weight (one
weight, hot in L2 where it fits; ``benchmarks/bench_sparse24.py`` gives cold and hot figures).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from conftest import replayer, time_interleaved  # noqa: E402

from llmprune_kernels import SparseLinear  # noqa: E402
from llmprune_kernels.testing import random_24_weight  # noqa: E402


@torch.no_grad()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default="decode", choices=["dense", "decode", "mmasp", "cusparselt", "cutlass"])
    ap.add_argument("--shape", default="4096x4096", help="out x in")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--no-timing", action="store_true", help="skip the CUDA-graph timing (under a profiler)")
    a = ap.parse_args(argv)
    out_f, in_f = (int(v) for v in a.shape.split("x"))
    dtype = getattr(torch, a.dtype)
    w = random_24_weight(out_f, in_f, dtype, "cuda")
    x = torch.randn(a.m, in_f, device="cuda", dtype=dtype)
    if a.path == "dense":
        fn = lambda: F.linear(x, w)  # noqa: E731
    else:
        lin = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=dtype)
        lin.weight.data = w
        mod = SparseLinear.from_linear(lin)
        mod.force_path = a.path
        mod.prepare()
        fn = lambda: mod(x)  # noqa: E731
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    print(f"profiled: {a.path} {a.shape} {a.dtype} M={a.m}, {a.calls} calls in the NVTX range 'sparse24'")
    torch.cuda.nvtx.range_push("sparse24")
    for _ in range(a.calls):
        fn()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()
    if not a.no_timing:
        t = time_interleaved({"dense": replayer([lambda: F.linear(x, w)]), a.path: replayer([fn])})
        print(f"{a.shape} {a.dtype} M={a.m}: dense {t['dense'] * 1e3:.1f} us, {a.path} {t[a.path] * 1e3:.1f} us "
              f"(dense / {a.path} = {t['dense'] / t[a.path]:.2f}; one weight, hot)")


if __name__ == "__main__":
    main()
