// CUDA column loop of one SparseGPT block, two kernels:
//  * warp_kernel (default): one warp per output row, lane l holding columns l, l+32, l+64, l+96 of the
//    block in registers; at column i the owning lane's weight and mask bit are broadcast by shuffle, every
//    lane computes the same error and updates its own later columns. 4096 rows give 4096 warps, enough to
//    fill the GPU, where one thread per row gives one warp per SM.
//  * thread_kernel (LLMPRUNE_SPARSEGPT_CUDA_KERNEL=thread): one thread per row, kRows rows per CTA, the
//    rows' weights in shared memory; kept as a second, independent implementation.
// Both stage the block's Hinv slice (count x count, upper triangle) in shared memory and run the
// reference's sequential loop over the block's columns for each row:
//   (N:M, at a group start) mask the prunen lowest w^2 / d^2 of the group, tie rule: lower column first
//   q = masked ? 0 : w;  err = (w - q) / d;  w[j] -= err * Hinv1[i, j] for j > i
// Rows never interact, so the loop needs no synchronisation. Arithmetic uses the _rn intrinsics: nvcc
// would otherwise fuse multiply and subtract into an FMA, rounding differently from the reference.
#include "sparsegpt/sparsegpt.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <string>

namespace llmprune {
namespace sparsegpt {

namespace {

constexpr int kRows = 32;         // rows (threads) per CTA: one warp, so 4096 rows fill ~128 SMs
constexpr int kLd = kRows + 1;    // padded column stride of the transposed tiles: no bank conflicts

__device__ __forceinline__ float score_of(float w, float d) {
  return __fdiv_rn(__fmul_rn(w, w), __fmul_rn(d, d));
}

__global__ void __launch_bounds__(kRows) thread_kernel(float* __restrict__ W, const float* __restrict__ Hinv,
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

size_t smem_bytes(int64_t count) {
  return static_cast<size_t>(count * count + 2 * count * kLd) * sizeof(float) + static_cast<size_t>(count * kLd);
}

size_t warp_smem_bytes(int64_t count) {
  return static_cast<size_t>(count * count + kWarps * 128) * sizeof(float);
}

bool use_thread_kernel() {
  const char* v = std::getenv("LLMPRUNE_SPARSEGPT_CUDA_KERNEL");
  return v != nullptr && std::string(v) == "thread";
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
  if (use_thread_kernel()) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(thread_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes(kCudaMaxBlock))));
    const int64_t grid = (rows + kRows - 1) / kRows;
    thread_kernel<<<static_cast<unsigned>(grid), kRows, smem_bytes(count), stream>>>(
        W.data_ptr<float>(), Hinv.data_ptr<float>(), mask.data_ptr<bool>(), err.data_ptr<float>(),
        losses.data_ptr<float>(), rows, W.size(1), i1, static_cast<int>(count), static_cast<int>(prunen),
        static_cast<int>(prunem));
  } else {
    C10_CUDA_CHECK(cudaFuncSetAttribute(warp_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(warp_smem_bytes(kCudaMaxBlock))));
    const int64_t grid = (rows + kWarps - 1) / kWarps;
    warp_kernel<<<static_cast<unsigned>(grid), kWarps * 32, warp_smem_bytes(count), stream>>>(
        W.data_ptr<float>(), Hinv.data_ptr<float>(), mask.data_ptr<bool>(), err.data_ptr<float>(),
        losses.data_ptr<float>(), rows, W.size(1), i1, static_cast<int>(count), static_cast<int>(prunen),
        static_cast<int>(prunem));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sparsegpt
}  // namespace llmprune
