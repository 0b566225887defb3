// CUDA column loop of one SparseGPT block: one thread per output row, kRows rows per CTA.
//
// A CTA stages the block's Hinv slice (count x count, upper triangle) and its rows' weights, mask and
// errors in shared memory, then every thread runs the reference's sequential loop over the block's
// columns for its row:
//   (N:M, at a group start) mask the prunen lowest w^2 / d^2 of the group, tie rule: lower column first
//   q = masked ? 0 : w;  err = (w - q) / d;  w[j] -= err * Hinv1[i, j] for j > i
// Rows never interact, so the loop needs no synchronisation. Arithmetic uses the _rn intrinsics: nvcc
// would otherwise fuse multiply and subtract into an FMA, rounding differently from the reference.
#include "sparsegpt/sparsegpt.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace llmprune {
namespace sparsegpt {

namespace {

constexpr int kRows = 32;         // rows (threads) per CTA: one warp, so 4096 rows fill ~128 SMs
constexpr int kLd = kRows + 1;    // padded column stride of the transposed tiles: no bank conflicts

__device__ __forceinline__ float score_of(float w, float d) {
  return __fdiv_rn(__fmul_rn(w, w), __fmul_rn(d, d));
}

__global__ void __launch_bounds__(kRows) block_kernel(float* __restrict__ W, const float* __restrict__ Hinv,
                                                      bool* __restrict__ mask, float* __restrict__ err,
                                                      float* __restrict__ losses, int64_t rows, int64_t cols,
                                                      int64_t i1, int count, int prunen, int prunem) {
  extern __shared__ float smem[];
  float* sH = smem;                                   // [count][count]: sH[i * count + j] = Hinv1[i, j]
  float* sW = sH + count * count;                     // [count][kLd]:  sW[j * kLd + t] = W[r0 + t, i1 + j]
  float* sE = sW + count * kLd;                       // [count][kLd]:  errors
  unsigned char* sM = reinterpret_cast<unsigned char*>(sE + count * kLd);  // [count][kLd]: mask

  const int t = threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int nrows = static_cast<int>(min(static_cast<int64_t>(kRows), rows - r0));

  const float* H1 = Hinv + i1 * cols + i1;
  for (int idx = t; idx < count * count; idx += kRows) {
    const int i = idx / count, j = idx - i * count;
    sH[idx] = j >= i ? H1[static_cast<int64_t>(i) * cols + j] : 0.f;
  }
  // Coalesced along each row of W; transposed into shared memory so thread t owns column t of the tile.
  for (int idx = t; idx < nrows * count; idx += kRows) {
    const int rr = idx / count, j = idx - rr * count;
    const int64_t g = (r0 + rr) * cols + i1 + j;
    sW[j * kLd + rr] = W[g];
    sM[j * kLd + rr] = prunem > 0 ? 0 : static_cast<unsigned char>(mask[g]);
  }
  __syncthreads();

  if (t < nrows) {
    float loss = 0.f;
    for (int i = 0; i < count; ++i) {
      const float* h = sH + i * count;
      if (prunem > 0 && i % prunem == 0) {
        // Rank of each score in the group under the stable ascending order; the prunen lowest are pruned.
        for (int a = 0; a < prunem; ++a) {
          const float sa = score_of(sW[(i + a) * kLd + t], sH[(i + a) * count + i + a]);
          int rank = 0;
          for (int b = 0; b < prunem; ++b) {
            const float sb = score_of(sW[(i + b) * kLd + t], sH[(i + b) * count + i + b]);
            rank += (sb < sa) || (sb == sa && b < a);
          }
          sM[(i + a) * kLd + t] = rank < prunen;
        }
      }
      const float w = sW[i * kLd + t];
      const float d = h[i];
      const float q = sM[i * kLd + t] ? 0.f : w;
      const float diff = __fsub_rn(w, q);
      loss = __fadd_rn(loss, score_of(diff, d));
      const float e = __fdiv_rn(diff, d);
      // Eight columns at a time, all loads issued before the stores: the compiler cannot prove sW and sH
      // apart, so without this each load waits for the previous store (one warp per CTA hides little).
      int j = i + 1;
      for (; j + 8 <= count; j += 8) {
        float hv[8], wv[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          hv[u] = h[j + u];
          wv[u] = sW[(j + u) * kLd + t];
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) sW[(j + u) * kLd + t] = __fsub_rn(wv[u], __fmul_rn(e, hv[u]));
      }
      for (; j < count; ++j) sW[j * kLd + t] = __fsub_rn(sW[j * kLd + t], __fmul_rn(e, h[j]));
      sW[i * kLd + t] = q;
      sE[i * kLd + t] = e;
    }
    losses[r0 + t] += loss / 2.f;
  }
  __syncthreads();

  for (int idx = t; idx < nrows * count; idx += kRows) {
    const int rr = idx / count, j = idx - rr * count;
    const int64_t g = (r0 + rr) * cols + i1 + j;
    W[g] = sW[j * kLd + rr];
    if (prunem > 0) mask[g] = sM[j * kLd + rr] != 0;
    err[(r0 + rr) * count + j] = sE[j * kLd + rr];
  }
}

size_t smem_bytes(int64_t count) {
  return static_cast<size_t>(count * count + 2 * count * kLd) * sizeof(float) + static_cast<size_t>(count * kLd);
}

}  // namespace

void block_update_cuda(at::Tensor& W, const at::Tensor& Hinv, at::Tensor& mask, at::Tensor& err,
                       at::Tensor& losses, int64_t i1, int64_t count, int64_t prunen, int64_t prunem) {
  TORCH_CHECK(W.is_cuda() && Hinv.is_cuda() && mask.is_cuda() && err.is_cuda() && losses.is_cuda(),
              "block_update_cuda: all tensors must be on the GPU");
  TORCH_CHECK(W.dim() == 2 && W.scalar_type() == at::kFloat && W.is_contiguous(), "W must be contiguous fp32 2-D");
  TORCH_CHECK(Hinv.scalar_type() == at::kFloat && Hinv.is_contiguous() && Hinv.size(0) == W.size(1) &&
                  Hinv.size(1) == W.size(1), "Hinv must be contiguous fp32 (cols x cols)");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.sizes() == W.sizes(),
              "mask must be a contiguous bool tensor shaped like W");
  TORCH_CHECK(err.scalar_type() == at::kFloat && err.is_contiguous() && err.size(0) == W.size(0) &&
                  err.size(1) == count, "err must be contiguous fp32 (rows x count)");
  TORCH_CHECK(losses.scalar_type() == at::kFloat && losses.is_contiguous() && losses.numel() == W.size(0),
              "losses must be contiguous fp32 (rows)");
  TORCH_CHECK(count > 0 && count <= kCudaMaxBlock && i1 >= 0 && i1 + count <= W.size(1),
              "block [", i1, ", ", i1 + count, ") invalid (at most ", kCudaMaxBlock, " columns)");
  const int64_t rows = W.size(0);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(W.device());
  const size_t smem = smem_bytes(count);
  C10_CUDA_CHECK(cudaFuncSetAttribute(block_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem_bytes(kCudaMaxBlock))));
  const int64_t grid = (rows + kRows - 1) / kRows;
  block_kernel<<<static_cast<unsigned>(grid), kRows, smem, c10::cuda::getCurrentCUDAStream()>>>(
      W.data_ptr<float>(), Hinv.data_ptr<float>(), mask.data_ptr<bool>(), err.data_ptr<float>(),
      losses.data_ptr<float>(), rows, W.size(1), i1, static_cast<int>(count), static_cast<int>(prunen),
      static_cast<int>(prunem));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sparsegpt
}  // namespace llmprune
