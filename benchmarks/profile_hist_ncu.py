"""One launch of the default unstructured select per LLaMA-7B shape, for Nsight Compute (ncu) to profile.

Usage: ncu --kernel-name regex:_rows_hist --section WarpStateStats ... python benchmarks/profile_hist_ncu.py
"""
import torch

from llmprune_kernels import SparsityConfig
from llmprune_kernels.ops.score_mask import score_and_mask

for shape in [(4096, 4096), (4096, 11008)]:
    w = torch.randn(shape, device="cuda", dtype=torch.float16)
    norm = torch.rand(shape[1], device="cuda") * 4
    for _ in range(2):
        score_and_mask(w, norm, SparsityConfig(0.5), check=False)
    torch.cuda.synchronize()
