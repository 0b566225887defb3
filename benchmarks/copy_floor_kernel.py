"""The score-and-mask kernel's bytes with no selection (read W and the norm row, write a bool): the copy floor
that bench_score_mask times and sass_score_mask costs statically."""
from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 2048  # columns per program
WARPS = 4


@triton.jit
def copy_floor_kernel(w_ptr, f_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n_cols
    w = tl.load(w_ptr + row * n_cols + cols, mask=m, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + cols, mask=m, other=0.0)
    tl.store(out_ptr + row * n_cols + cols, (w < f).to(tl.uint8), mask=m)
