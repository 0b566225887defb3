// CUDA column loop of one SparseGPT block: warp_kernel, one warp per output row, lane l holding columns
// l, l+32, l+64, l+96 of the block in registers; at column i the owning lane's weight and mask bit are
// broadcast by shuffle, every lane computes the same error and updates its own later columns. 4096 rows
// give 4096 warps, enough to fill the GPU, where one thread per row gives one warp per SM.
// It stages the block's Hinv slice (count x count, upper triangle) in shared memory and runs the
// reference's sequential loop over the block's columns for each row:
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

__device__ __forceinline__ float score_of(float w, float d) {
  return __fdiv_rn(__fmul_rn(w, w), __fmul_rn(d, d));
}

constexpr int kWarps = 16;                    // rows (warps) per CTA: 4096 rows -> 256 CTAs, one wave
constexpr int kSlots = 128 / 32;              // columns per lane
constexpr unsigned kFull = 0xffffffffu;

__global__ void __launch_bounds__(kWarps * 32) warp_kernel(float* __restrict__ W, const float* __restrict__ Hinv,
                                                          bool* __restrict__ mask, float* __restrict__ err,
                                                          float* __restrict__ losses, int64_t rows, int64_t cols,
                                                          int64_t i1, int count, int prunen, int prunem) {
  extern __shared__ float smem[];
  float* sH = smem;                              // [count][count]: sH[i * count + j] = Hinv1[i, j]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* scratch = sH + count * count + warp * 128;  // per-warp scores of one N:M group

  const float* H1 = Hinv + i1 * cols + i1;
  for (int idx = threadIdx.x; idx < count * count; idx += blockDim.x) {
    const int i = idx / count, j = idx - i * count;
    sH[idx] = j >= i ? H1[static_cast<int64_t>(i) * cols + j] : 0.f;
  }
  __syncthreads();  // the only block-wide barrier: warps past the last row may leave after it
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (r >= rows) return;

  float* Wr = W + r * cols + i1;
  bool* Mr = mask + r * cols + i1;
  float w[kSlots], e_own[kSlots];
  bool m[kSlots];
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    const int j = k * 32 + lane;
    w[k] = j < count ? Wr[j] : 0.f;
    m[k] = prunem == 0 && j < count ? Mr[j] : false;
    e_own[k] = 0.f;
  }
  float loss = 0.f;
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    for (int l = 0; l < 32; ++l) {
      const int i = k * 32 + l;
      if (i >= count) break;  // uniform across the warp
      if (prunem > 0 && i % prunem == 0) {
        // Group [i, i + prunem): scores from the weights as updated so far, then each lane ranks its own
        // columns of the group (stable ascending: lower column first among equal scores).
#pragma unroll
        for (int kk = k; kk < kSlots; ++kk) {
          const int j = kk * 32 + lane;
          if (j >= i && j < i + prunem) scratch[j - i] = score_of(w[kk], sH[j * count + j]);
        }
        __syncwarp();
#pragma unroll
        for (int kk = k; kk < kSlots; ++kk) {
          const int j = kk * 32 + lane;
          if (j >= i && j < i + prunem) {
            const int a = j - i;
            const float sa = scratch[a];
            int rank = 0;
            for (int b = 0; b < prunem; ++b) rank += (scratch[b] < sa) || (scratch[b] == sa && b < a);
            m[kk] = rank < prunen;
          }
        }
        __syncwarp();
      }
      const float wi = __shfl_sync(kFull, w[k], l);
      const bool pruned = __shfl_sync(kFull, static_cast<int>(m[k]), l) != 0;
      const float* h = sH + i * count;
      const float d = h[i];
      const float q = pruned ? 0.f : wi;
      const float diff = __fsub_rn(wi, q);
      loss = __fadd_rn(loss, score_of(diff, d));
      const float e = __fdiv_rn(diff, d);
#pragma unroll
      for (int kk = k; kk < kSlots; ++kk) {
        const int j = kk * 32 + lane;
        if (j > i && j < count) w[kk] = __fsub_rn(w[kk], __fmul_rn(e, h[j]));
      }
      if (lane == l) {
        w[k] = q;
        e_own[k] = e;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    const int j = k * 32 + lane;
    if (j < count) {
      Wr[j] = w[k];
      if (prunem > 0) Mr[j] = m[k];
      err[r * count + j] = e_own[k];
    }
  }
  if (lane == 0) losses[r] += loss / 2.f;
}

size_t warp_smem_bytes(int64_t count) {
  return static_cast<size_t>(count * count + kWarps * 128) * sizeof(float);
}

}  // namespace

void block_update_cuda(at::Tensor& W, const at::Tensor& Hinv, at::Tensor& mask, at::Tensor& err,
                       at::Tensor& losses, int64_t i1, int64_t count, int64_t prunen, int64_t prunem) {
  TORCH_CHECK(W.is_cuda() && Hinv.is_cuda() && mask.is_cuda() && err.is_cuda() && losses.is_cuda(),
              "block_update_cuda: all tensors must be on the GPU");
  check_block_args(W, Hinv, mask, err, losses, i1, count);
  TORCH_CHECK(count <= kCudaMaxBlock, "block of ", count, " columns; the CUDA kernel takes at most ", kCudaMaxBlock);
  const int64_t rows = W.size(0);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(W.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaFuncSetAttribute(warp_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(warp_smem_bytes(kCudaMaxBlock))));
  const int64_t grid = (rows + kWarps - 1) / kWarps;
  warp_kernel<<<static_cast<unsigned>(grid), kWarps * 32, warp_smem_bytes(count), stream>>>(
      W.data_ptr<float>(), Hinv.data_ptr<float>(), mask.data_ptr<bool>(), err.data_ptr<float>(),
      losses.data_ptr<float>(), rows, W.size(1), i1, static_cast<int>(count), static_cast<int>(prunen),
      static_cast<int>(prunem));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sparsegpt
}  // namespace llmprune
