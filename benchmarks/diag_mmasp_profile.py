"""Launches for a profiler: the mma.sp kernel on a 4096x4096 fp16 weight at M = 8 and M = 16 with the
tuned configs of sparse24_tuning_h100.json, three launches each after a warm-up, marked by NVTX ranges
($MMASP_PROFILE_CASES, e.g. "8:4,1,4;16:4,1,4", and $MMASP_PROFILE_REPS override both).

Run under Nsight Compute: ncu -k regex:mmasp --section SpeedOfLight ... python benchmarks/diag_mmasp_profile.py
--no-timing (the CUDA-graph timing launches would otherwise be profiled too); without a profiler and without
the flag it also prints each case's time (CUDA-graph median, one L2-warm weight).
"""
import os
import sys

import torch

from llmprune_kernels.sparse24.backends import mmasp as mm
from llmprune_kernels.sparse24.dispatch import random_24_weight, time_ms
from llmprune_kernels.sparse24.pack import pack_24

CASES = [(8, (4, 1, 4)), (16, (8, 2, 4)), (16, (4, 1, 4)), (16, (8, 1, 8))]
if os.environ.get("MMASP_PROFILE_CASES"):  # e.g. "8:4,1,4;16:4,1,4"
    CASES = [(int(m), tuple(int(v) for v in c.split(","))) for m, c in
             (case.split(":") for case in os.environ["MMASP_PROFILE_CASES"].split(";"))]
REPS = int(os.environ.get("MMASP_PROFILE_REPS", "3"))

L = mm.to_mmasp_layout(pack_24(random_24_weight(4096, 4096, torch.float16, "cuda")))
for m, cfg in CASES:
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    mm.mmasp_linear(x, L, None, cfg)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(f"M{m}_{cfg}")
    for _ in range(REPS):
        mm.mmasp_linear(x, L, None, cfg)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()
    if "--no-timing" not in sys.argv:
        print(f"M={m} config={cfg}: {time_ms([lambda: mm.mmasp_linear(x, L, None, cfg)]) * 1e3:.1f} us (one weight, L2-warm)")
