"""Host time per eager call of each 2:4 path against ``F.linear`` and ``nn.Linear``: where eager decoding is
bound by the CPU rather than by the kernels.

Eager decoding issues one small GEMM per Linear; when the host takes longer per call than the GPU, the GPU
waits and the kernel's speed no longer matters. Per shape and M, each path's calls are enqueued behind a long
GPU sleep (``torch.cuda._sleep``), so the GPU never waits for the host and the wall clock per call is the
host's time alone (``host_us``); then the eager time per call with the GPU in the loop (``eager_us``, CUDA
events over back-to-back calls). Paths: ``F.linear``, an ``nn.Linear`` module call, ``SparseLinear`` pinned
to each backend this build has (``force_path``) and as ``sparsify_`` dispatches it. Prints one JSON line per
case; ``--out`` writes them all with the environment. Run: ``python tools/host_overhead_sparse24.py``
(``--shapes 4096x4096 --ms 1,16,64 --dtype float16``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from conftest import env_info  # noqa: E402

from llmprune_kernels import SparseLinear, backends, sparsify_  # noqa: E402
from llmprune_kernels.testing import random_24_weight  # noqa: E402

ENGINES = ("cpp", "cuda", "triton")  # backends()'s compute engines; its other keys are the 2:4 backends


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


@torch.no_grad()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="256x256,4096x4096,4096x11008", help="out x in, comma-separated")
    ap.add_argument("--ms", default="1,16,64")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    have = backends()
    rows = []
    for shape in a.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        w = random_24_weight(out_f, in_f, dtype, "cuda")
        lin = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=dtype)
        lin.weight.data = w
        pinned = {}
        for path, ok in have.items():
            if ok and path not in ENGINES:
                mod = SparseLinear.from_linear(lin)
                mod.force_path = path
                pinned[path] = mod.prepare()
        lin2 = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=dtype)
        lin2.weight.data = w.clone()
        dispatched = sparsify_(nn.Sequential(lin2))  # tunes this shape
        for m in (int(v) for v in a.ms.split(",")):
            x = torch.randn(m, in_f, device="cuda", dtype=dtype)
            fns = {"F.linear": lambda: F.linear(x, w), "nn.Linear": lambda: lin(x),
                   "SparseLinear dispatched": lambda: dispatched[0](x)}
            fns.update({f"SparseLinear {p}": (lambda mod=mod: mod(x)) for p, mod in pinned.items()})
            res = {}
            for name, fn in fns.items():
                try:
                    res[name] = {"host_us": round(host_us(fn), 1), "eager_us": round(eager_us(fn), 1)}
                except Exception as exc:  # noqa: BLE001 - a path that cannot run this case
                    res[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            base = res["F.linear"].get("host_us")
            for r in res.values():
                if "host_us" in r and base:
                    r["host_over_F.linear"] = round(r["host_us"] / base, 2)
            row = {"shape": [out_f, in_f], "dtype": a.dtype, "m": m, "per_call": res}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"env": env_info(), "method": " ".join(__doc__.split("\n\n")[1].split()), "cases": rows}, f,
                      indent=1)
        print(a.out)


if __name__ == "__main__":
    main()
