"""Launch target for Nsight Compute: a few calls of ``score_and_mask`` per LLaMA-7B shape (after warm-up calls).

    ncu --nvtx --nvtx-include "score_mask/" --kernel-name regex:_rows_hist --section SpeedOfLight \\
        --section WarpStateStats --section MemoryWorkloadAnalysis_Tables python tools/ncu_score_mask.py

Options: ``--select hist|radix1`` (unstructured select), ``--pattern 50%|2:4``, ``--shapes 4096x4096,4096x11008``,
``--calls N`` (the calls of every shape run in the NVTX range ``score_mask``). Kernel names:
``_rows_hist_kernel`` (hist), ``_rows_kernel`` (radix1), ``_nm_kernel`` (2:4).
"""
from __future__ import annotations

import argparse

import torch

from llmprune_kernels import SparsityConfig
from llmprune_kernels.ops.score_mask import score_and_mask


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--select", default="hist", choices=["hist", "radix1"])
    ap.add_argument("--pattern", default="50%", choices=["50%", "2:4"])
    ap.add_argument("--shapes", default="4096x4096,4096x11008")
    ap.add_argument("--calls", type=int, default=3)
    a = ap.parse_args(argv)
    cfg = SparsityConfig(n=2, m=4) if a.pattern == "2:4" else SparsityConfig(0.5)
    tune = None if a.pattern == "2:4" else {"select": a.select}
    for shape in [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]:
        w = torch.randn(shape, device="cuda", dtype=torch.float16)
        norm = torch.rand(shape[1], device="cuda") * 4
        for _ in range(2):  # compile and warm up, outside the profiled NVTX range
            score_and_mask(w, norm, cfg, check=False, _tune=tune)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("score_mask")
        for _ in range(a.calls):
            score_and_mask(w, norm, cfg, check=False, _tune=tune)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()


if __name__ == "__main__":
    main()
