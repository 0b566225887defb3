// 2:4 decode matmul y = x @ W.T (+ bias) on the sparse tensor cores: mma.sp::ordered_metadata.m16n8k32;
// the kernel, shared by the 16-bit op (sparse24_mmasp.cu) and the 8-bit one (sparse24_mmasp8.cu); its host side is
// mmasp_launch.cuh.
//
// The weight is the sparse A operand (16 output features per MMA), x^T is B (tokens = MMA N: one n8 MMA
// for M <= 8, two for M <= 16), fp32 accumulation. The weight comes re-laid out in fragment order
// (llmprune_kernels/sparse24/backends/mmasp.py: a_frag [RB, NC*8, 32, 8], e_frag [RB, NC, 32, 4]), so each lane
// streams one 16-byte load per k-step for its A registers and one 16-byte load per 256 columns for its
// metadata words; everything is read once from HBM (L1 not allocated).
//
// Grid: (row tiles, splits). A CTA of `warps` warps owns warps * rows_per_warp row blocks of 16 and the
// 256-column chunks [s*NC/splits, (s+1)*NC/splits) of K; its x slice sits in shared memory (zero rows
// beyond M and zero columns beyond K, copied with cp.async in two groups: the first chunk, whose MMAs start
// while the rest arrives, then the rest) and feeds B through ldmatrix.x4. A registers are loaded two chunks
// ahead of the MMAs. The `splits` CTAs of a row tile form one thread-block cluster: each writes its fp32
// partial tile to shared memory, and cluster rank q sums all partials (distributed shared memory, rank
// order) for 1/splits of the tile's rows, adds the bias and stores y. One launch, no workspace, no atomics.
// Clusters need sm_90 code: code compiled for sm_80 (an Ampere build, or its PTX run on a newer GPU) runs
// splits = 1 only, which the host side enforces from the arch the loaded code reports (code_arch).
// The CPU emulator llmprune_kernels/testing/mmasp_emulator.py mirrors every index computed here.

#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <optional>

namespace llmprune {

int64_t code_arch(int64_t device);  // sparse24_mmasp.cu

namespace sparse24_mmasp {

namespace cg = cooperative_groups;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define LLMPRUNE_MMASP_CLUSTERS 1
#endif

constexpr int kChunk = 256;  // input columns per metadata load (8 k-steps of 32)
constexpr int kQ16 = 0, kQ8Fp8 = 1, kQ8Int8 = 2;  // A values: fp16 / bf16 as the MMA takes them, FP8 e4m3, INT8

struct Params {
  const uint4* a;     // [RB, NC*8, 32] 16-byte A fragments (8-bit values: [RB, NC*4, 32], two k-steps each)
  const uint4* e;     // [RB, NC, 32] 16-byte metadata words
  const void* x;      // [M, K], row stride x_stride elements
  const void* bias;   // [R] or nullptr
  const float* scale; // [R] per-row scales of 8-bit values (nullptr for fp16 / bf16 values)
  void* y;            // [M, R] contiguous
  int M, K, R, RB, NC, splits, kslice;
  long long x_stride;
  bool x16;  // x rows 16-byte aligned with K % 8 == 0: 16-byte copies (half the copy instructions)
};

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// 8- or 16-byte global -> shared copy; src_bytes = 0 writes zeros without reading.
__device__ __forceinline__ void cp_async8(void* smem_dst, const void* src, int src_bytes) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* src, int src_bytes) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&b)[4], const void* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
               : "r"(addr)
               : "memory");
}

template <bool BF16, int SEL>
__device__ __forceinline__ void mma_sp(float (&d)[4], const uint4& a, const uint32_t (&b)[4], uint32_t e) {
  if constexpr (BF16) {
    asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e), "n"(SEL));
  } else {
    asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e), "n"(SEL));
  }
}

__device__ __forceinline__ uint32_t word(const uint4& v, int w) {
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// One chunk's A fragments and metadata of the warp's WR row blocks: 16 bytes a lane per k-step for 16-bit
// values, per two k-steps for 8-bit ones.
template <int WR, int Q8>
struct Frag {
  static constexpr int KA = Q8 == kQ16 ? 8 : 4;
  uint4 a[WR][KA];
  uint4 e[WR];
};

template <int WR, int Q8>
__device__ __forceinline__ void load_chunk(Frag<WR, Q8>& f, const Params& p, int rb0, int c, int lane) {
  constexpr int KA = Frag<WR, Q8>::KA;
#pragma unroll
  for (int i = 0; i < WR; ++i) {
    const int rb = rb0 + i;
    if (rb < p.RB) {
      const uint4* ap = p.a + (static_cast<size_t>(rb) * p.NC * KA + static_cast<size_t>(c) * KA) * 32 + lane;
#pragma unroll
      for (int k = 0; k < KA; ++k) f.a[i][k] = ld_stream(ap + k * 32);
      f.e[i] = ld_stream(p.e + (static_cast<size_t>(rb) * p.NC + c) * 32 + lane);
    }
  }
}

template <typename H2>
__device__ __forceinline__ uint32_t bits(H2 v) {
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The four 8-bit values of word w (low byte first) as two A registers of the MMA's 16-bit type, exactly
// (every FP8 e4m3 and INT8 value is a fp16 and a bf16 value); the per-row scale is applied to the result.
template <int Q8, bool BF16>
__device__ __forceinline__ void widen(uint32_t w, uint32_t& r0, uint32_t& r1) {
  if constexpr (Q8 == kQ8Fp8) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm("{ .reg .b16 lo, hi; mov.b32 {lo, hi}, %2; cvt.rn.f16x2.e4m3x2 %0, lo; cvt.rn.f16x2.e4m3x2 %1, hi; }"
        : "=r"(r0), "=r"(r1) : "r"(w));
    if constexpr (BF16) {
      r0 = bits(__float22bfloat162_rn(__half22float2(*reinterpret_cast<const __half2*>(&r0))));
      r1 = bits(__float22bfloat162_rn(__half22float2(*reinterpret_cast<const __half2*>(&r1))));
    }
#else
    __trap();  // e4m3 conversions need sm_89 code: the host refuses FP8 weights for older code
#endif
  } else if constexpr (BF16) {
    const float v0 = static_cast<float>(static_cast<int8_t>(w & 0xFF));
    const float v1 = static_cast<float>(static_cast<int8_t>((w >> 8) & 0xFF));
    const float v2 = static_cast<float>(static_cast<int8_t>((w >> 16) & 0xFF));
    const float v3 = static_cast<float>(static_cast<int8_t>(w >> 24));
    r0 = bits(__floats2bfloat162_rn(v0, v1));
    r1 = bits(__floats2bfloat162_rn(v2, v3));
  } else {  // fp16 1024 + (b + 128) from the bits 0x64 | (b ^ 0x80), minus 1152
    const uint32_t u = w ^ 0x80808080u;
    const __half2 bias = __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480));
    const uint32_t lo = __byte_perm(u, 0x64646464u, 0x5140), hi = __byte_perm(u, 0x64646464u, 0x7362);
    r0 = bits(__hsub2(*reinterpret_cast<const __half2*>(&lo), bias));
    r1 = bits(__hsub2(*reinterpret_cast<const __half2*>(&hi), bias));
  }
}

// k-step kk's A registers: the 16-bit fragment as loaded, or the 8-bit one widened.
template <int Q8, bool BF16, int WR>
__device__ __forceinline__ uint4 a_regs(const Frag<WR, Q8>& f, int i, int kk) {
  if constexpr (Q8 == kQ16) {
    return f.a[i][kk];
  } else {
    const uint4& v = f.a[i][kk >> 1];
    uint4 a;
    widen<Q8, BF16>((kk & 1) ? v.z : v.x, a.x, a.y);
    widen<Q8, BF16>((kk & 1) ? v.w : v.y, a.z, a.w);
    return a;
  }
}

template <bool BF16, int NT, int WR, int Q8>
__device__ __forceinline__ void mma_chunk(float (&acc)[WR][NT][4], const Frag<WR, Q8>& f, const char* xs_lane,
                                          int stride_bytes) {
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    uint32_t b[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) ldmatrix_x4(b[nt], xs_lane + nt * 8 * stride_bytes + kk * 64);
#pragma unroll
    for (int i = 0; i < WR; ++i) {
      const uint32_t e = word(f.e[i], kk >> 1);
      const uint4 a = a_regs<Q8, BF16, WR>(f, i, kk);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if (kk & 1) {
          mma_sp<BF16, 1>(acc[i][nt], a, b[nt], e);
        } else {
          mma_sp<BF16, 0>(acc[i][nt], a, b[nt], e);
        }
      }
    }
  }
}

// Chunks [j0, j1) of the CTA's x slice (chunk j = columns (c0 + j) * 256 ...) -> shared memory, UE elements
// per copy (8: 16-byte copies, needs 16-byte aligned rows and K % 8 == 0; 4: 8-byte, K % 4 == 0), zeros for rows
// >= M and columns past the slice or K; then one cp.async commit group.
template <typename T, int NT, int UE>
__device__ __forceinline__ void copy_x(const Params& p, T* xs, int stride, int c0, int c1, int j0, int j1) {
  constexpr int kPer = kChunk / UE;  // copies per row and chunk
  const int units = (j1 - j0) * kPer;
  const int live_units = (c1 - c0) * kPer;
  const T* x = reinterpret_cast<const T*>(p.x);
  for (int idx = threadIdx.x; idx < NT * 8 * units; idx += blockDim.x) {
    const int n = idx / units, u = j0 * kPer + (idx - n * units);
    const int k = c0 * kChunk + u * UE;
    T* dst = xs + n * stride + u * UE;
    if (n < p.M) {
      const bool in = u < live_units && k < p.K;
      const T* src = in ? x + n * p.x_stride + k : x;  // a valid address even when nothing is read
      if constexpr (UE == 8) cp_async16(dst, src, in ? 16 : 0);
      else cp_async8(dst, src, in ? 8 : 0);
    } else if constexpr (UE == 8) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    } else {
      *reinterpret_cast<uint2*>(dst) = make_uint2(0u, 0u);
    }
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
}

template <typename T, bool BF16, int NT, int WR, int Q8>
__global__ void __launch_bounds__(256) mmasp_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sp and cp.async need sm_80 (the host side refuses older code)
#else
  extern __shared__ __align__(16) unsigned char smem[];
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int s = blockIdx.y;
  const int c0 = static_cast<int>(static_cast<long long>(s) * p.NC / p.splits);
  const int c1 = static_cast<int>(static_cast<long long>(s + 1) * p.NC / p.splits);
  const int stride = p.kslice * kChunk + 8;  // halves; 16 * odd bytes: conflict-free ldmatrix rows
  const int xs_bytes = (NT * 8 * stride * 2 + 15) & ~15;
  T* xs = reinterpret_cast<T*>(smem);
  float* part = reinterpret_cast<float*>(smem + xs_bytes);
  const int rows_cta = warps * WR * 16;
  const int rb0 = (blockIdx.x * warps + warp) * WR;
  const bool active = rb0 < p.RB;  // warp-uniform

  // A for the first two chunks goes out before anything waits.
  Frag<WR, Q8> f0, f1;
  if (active && c0 < c1) load_chunk<WR, Q8>(f0, p, rb0, c0, lane);
  if (active && c0 + 1 < c1) load_chunk<WR, Q8>(f1, p, rb0, c0 + 1, lane);

  // x slice [NT*8, (c1-c0)*256] -> shared memory (zeros outside [M, K)) in two cp.async groups: the first
  // chunk, then the rest, so the first chunk's MMAs run while the rest of the slice is still arriving.
  if (p.x16) {
    copy_x<T, NT, 8>(p, xs, stride, c0, c1, 0, 1);
    copy_x<T, NT, 8>(p, xs, stride, c0, c1, 1, p.kslice);
  } else {
    copy_x<T, NT, 4>(p, xs, stride, c0, c1, 0, 1);
    copy_x<T, NT, 4>(p, xs, stride, c0, c1, 1, p.kslice);
  }

  float acc[WR][NT][4];
#pragma unroll
  for (int i = 0; i < WR; ++i)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][nt][r] = 0.f;

  // ldmatrix.x4: lane 8j + r gives row r of matrix j = x[nt*8 + r][k-step + 8j .. +8].
  const char* xs_lane = reinterpret_cast<const char*>(xs + (lane & 7) * stride + 8 * (lane >> 3));
  const int stride_bytes = stride * 2;
  asm volatile("cp.async.wait_group 1;" ::: "memory");
  __syncthreads();  // every thread's copies of chunk 0 (and the zero rows) are visible
  if (active && c0 < c1) {
    mma_chunk<BF16, NT, WR, Q8>(acc, f0, xs_lane, stride_bytes);
    if (c0 + 2 < c1) load_chunk<WR, Q8>(f0, p, rb0, c0 + 2, lane);
  }
  asm volatile("cp.async.wait_group 0;" ::: "memory");
  __syncthreads();
  if (active) {  // chunks c0+1, c0+2, ... alternate between f1 and f0, A loaded two chunks ahead
    for (int c = c0 + 1; c < c1; c += 2) {
      mma_chunk<BF16, NT, WR, Q8>(acc, f1, xs_lane + (c - c0) * kChunk * 2, stride_bytes);
      if (c + 2 < c1) load_chunk<WR, Q8>(f1, p, rb0, c + 2, lane);
      if (c + 1 < c1) {
        mma_chunk<BF16, NT, WR, Q8>(acc, f0, xs_lane + (c + 1 - c0) * kChunk * 2, stride_bytes);
        if (c + 3 < c1) load_chunk<WR, Q8>(f0, p, rb0, c + 3, lane);
      }
    }
  }

  // Partial tile [rows_cta, NT*8] fp32: D element r of lane (g, t) is row g + 8*(r/2), column 2t + r%2;
  // 8-bit values: times the row's scale.
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < WR; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = (warp * WR + i) * 16 + g + 8 * h;
      float s = 1.f;
      if constexpr (Q8 != kQ16) {
        const int grow = blockIdx.x * rows_cta + row;
        s = grow < p.R ? __ldg(p.scale + grow) : 0.f;
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int r = 2 * h; r < 2 * h + 2; ++r) part[row * (NT * 8) + nt * 8 + 2 * t + (r & 1)] = acc[i][nt][r] * s;
    }

#ifdef LLMPRUNE_MMASP_CLUSTERS
  cg::cluster_group cluster = cg::this_cluster();
  const bool clustered = p.splits > 1;
  if (clustered) cluster.sync(); else __syncthreads();
  const int q = clustered ? static_cast<int>(cluster.block_rank()) : 0;
#else
  if (p.splits > 1) __trap();  // sm_80 code has no clusters; the host launches it with splits = 1 only
  __syncthreads();
  const int q = 0;
#endif
  const int r0 = q * rows_cta / p.splits, r1 = (q + 1) * rows_cta / p.splits, nrows = r1 - r0;
  const T* bias = reinterpret_cast<const T*>(p.bias);
  T* y = reinterpret_cast<T*>(p.y);
  for (int idx = threadIdx.x; idx < nrows * p.M; idx += blockDim.x) {
    const int n = idx / nrows, row = r0 + (idx - n * nrows);
    const int grow = blockIdx.x * rows_cta + row;
    if (grow >= p.R) continue;
    // All partials are loaded before the first add (unrolled to the largest split count): distributed
    // shared memory reads are slow, and one after another they serialise. Summed in rank order as before.
    float pv[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
#ifdef LLMPRUNE_MMASP_CLUSTERS
      if (k < p.splits) pv[k] = (clustered ? cluster.map_shared_rank(part, k) : part)[row * (NT * 8) + n];
#else
      if (k < p.splits) pv[k] = part[row * (NT * 8) + n];
#endif
    }
    float v = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (k < p.splits) v += pv[k];
    }
    if (bias != nullptr) v += to_float<T>(bias[grow]);
    y[static_cast<size_t>(n) * p.R + grow] = from_float<T>(v);
  }
#ifdef LLMPRUNE_MMASP_CLUSTERS
  if (clustered) cluster.sync();  // keep every rank's partials alive until all reads are done
#endif
#endif
}

}  // namespace sparse24_mmasp
}  // namespace llmprune
