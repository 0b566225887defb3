"""Launches for a profiler: the mma.sp kernel on a 4096x4096 fp16 weight at M = 8 and M = 16 with the
tuned configs of sparse24_tuning_h100.json, three launches each after a warm-up, marked by NVTX ranges.

Run under Nsight Compute: ncu -k regex:mmasp --section SpeedOfLight ... python benchmarks/diag_mmasp_profile.py
Without a profiler it prints each launch's time (CUDA-graph median) so the run is still informative.
"""
import torch

from llmprune_kernels.ops import sparse24_mmasp as mm
from llmprune_kernels.sparse24.dispatch import random_24_weight, time_ms
from llmprune_kernels.sparse24.pack import pack_24

CASES = [(8, (4, 1, 4)), (16, (8, 2, 4)), (16, (4, 1, 4)), (16, (8, 1, 8))]

L = mm.to_mmasp_layout(pack_24(random_24_weight(4096, 4096, torch.float16, "cuda")))
for m, cfg in CASES:
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    mm.mmasp_linear(x, L, None, cfg)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(f"M{m}_{cfg}")
    for _ in range(3):
        mm.mmasp_linear(x, L, None, cfg)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()
    print(f"M={m} config={cfg}: {time_ms([lambda: mm.mmasp_linear(x, L, None, cfg)]) * 1e3:.1f} us (one weight, L2-warm)")
