"""Host time per eager call of each 2:4 path (diagnostic for eager decoding being slower than dense).

Eager decoding issues one small GEMM per Linear; when the host takes longer per call than the GPU, the
GPU waits and the speed of the kernel no longer matters. For a tiny layer (GPU time negligible) and a
LLaMA-7B layer at M = 1, this times N back-to-back calls (wall clock, one synchronisation at the end) of
dense ``F.linear``, ``SparseLinear`` pinned to each path, and the raw mma.sp op called through the
dispatcher (with its Python autograd kernel) and straight to its CUDA kernel (``redispatch``); then a
cProfile of the mma.sp ``SparseLinear`` call. Run: python benchmarks/diag_eager_overhead.py out.json
"""
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch
import torch.nn.functional as F

from llmprune_kernels.sparse24 import SparseLinear
from llmprune_kernels.sparse24.backends import mmasp as mmasp
from llmprune_kernels.sparse24.backends import cusparselt as cslt
from llmprune_kernels.testing import random_24_weight

N = 2000


def per_call_us(fn, n: int = N) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


@torch.no_grad()
def main(out_path: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import collect_env_info

    rows = []
    for out_f, in_f in ((256, 256), (4096, 4096)):
        w = random_24_weight(out_f, in_f, torch.float16, "cuda")
        x = torch.randn(1, in_f, device="cuda", dtype=torch.float16)
        row = {"shape": [out_f, in_f], "m": 1, "us_per_call": {}}
        t = row["us_per_call"]
        t["dense_F.linear"] = per_call_us(lambda x=x, w=w: F.linear(x, w))
        lin = torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.float16)
        lin.weight.data.copy_(w)
        paths = ["dense", "decode"] + (["cusparselt"] if cslt.available() else []) + (
            ["mmasp"] if mmasp.available() else [])
        for path in paths:
            sl = SparseLinear.from_linear(lin)
            sl.force_path = path
            sl.prepare()
            t[f"SparseLinear_{path}"] = per_call_us(lambda sl=sl, x=x: sl(x))
        t["nn.Linear_module"] = per_call_us(lambda lin=lin, x=x: lin(x))
        if cslt.available():
            comp = cslt.compress(w)
            op = torch.ops.llmprune_kernels.sparse24_cslt_linear.default
            for m in (1, 16, 64):
                xm = torch.randn(m, in_f, device="cuda", dtype=torch.float16)
                t[f"cslt_op_m{m}"] = per_call_us(lambda op=op, xm=xm, comp=comp, o=out_f: op(xm, comp, o, None))
                t[f"F.linear_m{m}"] = per_call_us(lambda xm=xm, w=w: F.linear(xm, w))
            x16 = torch.randn(16, in_f, device="cuda", dtype=torch.float16)
            t["empty_like_x16"] = per_call_us(lambda x16=x16: torch.empty_like(x16))
            t["pad_x1_to_16"] = per_call_us(lambda x=x: F.pad(x, (0, 0, 0, 15)))
        if mmasp.available():
            sl = SparseLinear.from_linear(lin)
            L = sl._mmasp_layout()
            cfg = mmasp.default_config(out_f, in_f, 1)
            op = torch.ops.llmprune_kernels.sparse24_mmasp_linear.default
            keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
            args = (x, L.a_frag, L.e_frag, out_f, None, *cfg)
            t["mmasp_op_dispatcher"] = per_call_us(lambda op=op, args=args: op(*args))
            t["mmasp_op_redispatch_cuda"] = per_call_us(lambda op=op, args=args, keys=keys: op.redispatch(keys, *args))
            sl.force_path = "mmasp"
            sl.prepare()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(500):
                sl(x)
            prof.disable()
            torch.cuda.synchronize()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
            row["cprofile_mmasp_500_calls"] = s.getvalue()[-3000:]
        print(json.dumps({k: v for k, v in row.items() if k != "cprofile_mmasp_500_calls"}), flush=True)
        rows.append(row)
    with open(out_path + ".part", "w") as f:
        json.dump({"env": collect_env_info(), "method": __doc__.strip().splitlines()[0], "calls": N, "cases": rows},
                  f, indent=1)
    os.replace(out_path + ".part", out_path)


if __name__ == "__main__":
    main(sys.argv[1])
