"""Static cost of every 2:4 decode candidate on sm_90, without a GPU: compile for Hopper, read the SASS.

For each tuning candidate (``sparse24_matmul.candidates``) and M in {1, 2, 4, 16}: registers, spills, shared
memory, and the main loop's instruction count per weight group (4 input columns) per thread, with its
mix (loads, selects, FMAs, shared-memory traffic, barriers). At decode sizes the kernel must issue its
instructions faster than HBM delivers the weight: an H100 SM issues 128 thread-instructions per cycle
and receives about 2.4 groups per cycle at 2.5 TB/s, so a loop needs well under ~50 instructions per
group to stay bandwidth-bound. This says nothing about latency hiding; GPU timings decide.
Writes ``benchmarks/results/sparse24_sass_sm90_triton<version>.json`` (the Triton version matters: 3.6,
on the H100 machine, lays out some kernels differently from 3.9). Run: ``python benchmarks/sass_sparse24.py``
(needs Triton's bundled CUDA tools; about a minute per dtype on a CPU).
"""
from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sass_tools import compile_kernel, sass_stats  # noqa: E402

from llmprune_kernels.sparse24.backends import _decode_stream as sg
from llmprune_kernels.sparse24.backends import decode as s24

def candidate_stats(cfg: tuple, m: int, dtype: torch.dtype) -> dict:
    bn, bk, _, warps, _, kind = cfg
    tt = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    scalars = ["M", "N", "K", "K_PER_SPLIT", "G", "G_PER_SPLIT", "stride_xm", "stride_vn", "stride_wn", "stride_mn",
               "stride_ym", "stride_ys"]
    types = {n: "i32" for n in scalars}
    types.update(x_ptr=f"*{tt}", v_ptr="*i32", w_ptr="*i32", m_ptr="*u8", b_ptr=f"*{tt}", y_ptr=f"*{tt}")
    div16 = ["x_ptr", "v_ptr", "w_ptr", "m_ptr", "b_ptr", "y_ptr", "K_PER_SPLIT", "G_PER_SPLIT", "stride_xm",
             "stride_vn", "stride_wn", "stride_mn", "stride_ym"]
    if kind in (s24.KIND_SELECT, s24.KIND_EXPAND):
        fn, bg, bm = sg._sparse24_stream_kernel, bk // 4, triton.next_power_of_2(m)
        consts = {"HAS_BIAS": False, "SPLIT_K": 1, "EXPAND": kind == s24.KIND_EXPAND,
                  "ACC3": bm * bn * bg <= 1024 * warps, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_G": bg}
    else:
        fn = s24._sparse24_mm_kernel
        consts = {"HAS_BIAS": False, "IEEE": False, "SPLIT_K": 1, "PAIRS": True, "SWAP": kind == s24.KIND_DOT_SWAP,
                  "BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk}
    div16 = [n for n in div16 if n in fn.arg_names]
    st = sass_stats(compile_kernel(fn, types, consts, warps, div16))
    groups_per_thread = bn * bk // 4 / (32 * warps)
    st["loop_instructions_per_group"] = round(st["loop_instructions"] / groups_per_thread, 1)
    st["tile_bytes"] = int(bn * bk // 4 * 4.5)
    return st


def main() -> None:
    out = {"target": "sm_90", "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "method": __doc__.split("\n\n")[1].replace("\n", " "), "candidates": {}}
    for dtype in (torch.float16, torch.bfloat16):
        for m in (1, 2, 4, 16):
            extra = [(16, 256, 1, 4, 1, s24.KIND_EXPAND), (8, 512, 1, 4, 1, s24.KIND_EXPAND)] if m in (2, 4) else []
            for cfg in s24.candidates(m, dtype) + extra:
                key = f"{str(dtype).removeprefix('torch.')} M={m} {s24.config_name(cfg)}"
                key += " (not tuned)" if cfg in extra else ""
                try:
                    out["candidates"][key] = candidate_stats(cfg, m, dtype)
                except Exception as exc:  # noqa: BLE001 - report it and go on
                    out["candidates"][key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                print(key, out["candidates"][key].get("loop_instructions_per_group"), file=sys.stderr)
    name = f"sparse24_sass_sm90_triton{'.'.join(triton.__version__.split('.')[:2])}.json"
    path = os.environ.get("SASS_OUT", os.path.join(os.path.dirname(__file__), "results", name))
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(path)


if __name__ == "__main__":
    main()
