"""Random weights of a given sparsity pattern, for tests, benchmarks and dispatch tuning."""
from __future__ import annotations

import torch

from llmprune_kernels.selection import prune_nm


def random_24_weight(out_features: int, in_features: int, dtype: torch.dtype = torch.float16,
                     device="cpu") -> torch.Tensor:
    """A random weight pruned 2:4 by magnitude (the 2 smallest |w| of every 4 zeroed)."""
    w = torch.randn(out_features, in_features, device=device).to(dtype)
    return w.masked_fill_(prune_nm(w.abs().float(), 2, 4), 0)
