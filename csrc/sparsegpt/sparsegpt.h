// SparseGPT (Frantar & Alistarh 2023) as a compiled op; see llmprune_kernels/reference/sparsegpt.py for the
// algorithm this must equal and llmprune_kernels/ops/sparsegpt.py for the Python entry.
#pragma once

#include <ATen/ATen.h>

namespace llmprune {
namespace sparsegpt {

// Column loop of one block [i1, i1 + count) of the fp32 row-major weight W (rows x cols), in place.
//   Hinv:   (cols x cols) upper Cholesky factor of H^-1, row-major.
//   mask:   (rows x cols) bool; unstructured (prunem == 0): the block's mask is read (chosen beforehand);
//           N:M: written, the prunen lowest w^2 / Hinv[j,j]^2 of each group of prunem, chosen at the group
//           start from the weights as updated so far (tie rule: lower column index pruned first).
//   err:    (rows x count) contiguous, receives (w - q) / Hinv[i,i] per column (for the lazy GEMM).
//   losses: (rows) accumulates sum_i (w - q)^2 / Hinv[i,i]^2 / 2.
// Rows are independent; each row runs the sequential loop over the block's columns. Every floating
// operation is the single IEEE operation the reference performs (no fused multiply-add), so results match
// the reference bit for bit.
// Shapes, dtypes and layout of block_update's arguments (shared by the CPU and CUDA paths).
void check_block_args(const at::Tensor& W, const at::Tensor& Hinv, const at::Tensor& mask, const at::Tensor& err,
                      const at::Tensor& losses, int64_t i1, int64_t count);

void block_update_cpu(at::Tensor& W, const at::Tensor& Hinv, at::Tensor& mask, at::Tensor& err,
                      at::Tensor& losses, int64_t i1, int64_t count, int64_t prunen, int64_t prunem);

#ifdef LLMPRUNE_WITH_CUDA
constexpr int64_t kCudaMaxBlock = 128;  // the block's Hinv slice lives in shared memory (64 KiB at 128)
void block_update_cuda(at::Tensor& W, const at::Tensor& Hinv, at::Tensor& mask, at::Tensor& err,
                       at::Tensor& losses, int64_t i1, int64_t count, int64_t prunen, int64_t prunem);
#endif

}  // namespace sparsegpt
}  // namespace llmprune
