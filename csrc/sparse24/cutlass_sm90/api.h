// Entry points of the CUTLASS sm90 2:4 GEMM (kernels.cuh), as plain functions so the op binding
// (op.cpp) compiles without CUTLASS and each (dtype, tile config) instantiation is its own translation
// unit (gemm_<dtype>_<config>.cu): ninja builds them in parallel, each in about 30 s.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace llmprune::cutlass24 {

// A config is a tile config and a tile-scheduler setting: config = tile + kTiles * (swizzle_log2 + 4 * raster).
// Tiles (threadblock out x tokens x K, cluster), all cooperative persistent kernels (each is compiled):
// 0: 128x128x64, cluster 2x1; 1: 128x256x64, cluster 1x2; 2: 256x128x64, cluster 2x1;
// 3: 256x128x64, cluster 2x1, stream-K scheduler; 4: 256x128x64, cluster 1x2;
// 5: 128x128x64, cluster 2x1, ping-pong; 6: 64x256x64, cluster 1x2, ping-pong.
// The schedule is a runtime argument (no extra code): swizzle 1/2/4/8 tiles, raster 0 = CUTLASS's
// heuristic, 1 = along out (M), 2 = along tokens (N); it decides which tiles share L2 at a time.
constexpr int kTiles = 7;
constexpr int kConfigs = kTiles * 4 * 3;

struct Schedule {
  int swizzle;  // 1, 2, 4 or 8
  int raster;   // 0 heuristic, 1 along M, 2 along N
};

inline int tile_of(int config) { return config % kTiles; }
inline Schedule schedule_of(int config) { return {1 << ((config / kTiles) % 4), config / (kTiles * 4)}; }

struct PackedSizes {
  int64_t values;      // elements of the compressed values (out x in/2 plus CUTLASS's padding)
  int64_t meta_bytes;  // bytes of metadata
};

#define LLMPRUNE_CUTLASS24_DECLARE_DTYPE(dt)                                                              \
  PackedSizes packed_sizes_##dt(int out, int in);                                                         \
  size_t compress_workspace_##dt(int out, int in, int device, int sm_count);                              \
  cudaError_t compress_##dt(const void* dense, void* values, void* meta, int out, int in, int device,     \
                            int sm_count, void* workspace, cudaStream_t stream);

#define LLMPRUNE_CUTLASS24_DECLARE_GEMM(dt, cfg)                                                          \
  size_t gemm_workspace_##dt##_##cfg(int out, int tokens, int in, int device, int sm_count,              \
                                     Schedule sched);                                                      \
  cudaError_t gemm_##dt##_##cfg(const void* values, const void* meta, const void* x, void* y, int out,    \
                                int tokens, int in, int device, int sm_count, Schedule sched,             \
                                void* workspace, cudaStream_t stream);

LLMPRUNE_CUTLASS24_DECLARE_DTYPE(f16)
LLMPRUNE_CUTLASS24_DECLARE_DTYPE(bf16)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(f16, 0)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(f16, 1)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(f16, 2)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(f16, 3)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(f16, 4)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(f16, 5)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(f16, 6)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 0)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 1)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 2)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 3)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 4)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 5)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 6)

// Runtime dispatch over dtype (bf16 when `bf16`) and config.
inline size_t gemm_workspace(bool bf16, int config, int out, int tokens, int in, int device, int sm_count) {
  const Schedule s = schedule_of(config);
#define LLMPRUNE_CUTLASS24_WS_ARGS out, tokens, in, device, sm_count, s
  switch (tile_of(config)) {
    case 1: return bf16 ? gemm_workspace_bf16_1(LLMPRUNE_CUTLASS24_WS_ARGS) : gemm_workspace_f16_1(LLMPRUNE_CUTLASS24_WS_ARGS);
    case 2: return bf16 ? gemm_workspace_bf16_2(LLMPRUNE_CUTLASS24_WS_ARGS) : gemm_workspace_f16_2(LLMPRUNE_CUTLASS24_WS_ARGS);
    case 3: return bf16 ? gemm_workspace_bf16_3(LLMPRUNE_CUTLASS24_WS_ARGS) : gemm_workspace_f16_3(LLMPRUNE_CUTLASS24_WS_ARGS);
    case 4: return bf16 ? gemm_workspace_bf16_4(LLMPRUNE_CUTLASS24_WS_ARGS) : gemm_workspace_f16_4(LLMPRUNE_CUTLASS24_WS_ARGS);
    case 5: return bf16 ? gemm_workspace_bf16_5(LLMPRUNE_CUTLASS24_WS_ARGS) : gemm_workspace_f16_5(LLMPRUNE_CUTLASS24_WS_ARGS);
    case 6: return bf16 ? gemm_workspace_bf16_6(LLMPRUNE_CUTLASS24_WS_ARGS) : gemm_workspace_f16_6(LLMPRUNE_CUTLASS24_WS_ARGS);
    default: return bf16 ? gemm_workspace_bf16_0(LLMPRUNE_CUTLASS24_WS_ARGS) : gemm_workspace_f16_0(LLMPRUNE_CUTLASS24_WS_ARGS);
  }
#undef LLMPRUNE_CUTLASS24_WS_ARGS
}

inline cudaError_t gemm(bool bf16, int config, const void* values, const void* meta, const void* x, void* y, int out,
                        int tokens, int in, int device, int sm_count, void* workspace, cudaStream_t stream) {
  const Schedule s = schedule_of(config);
#define LLMPRUNE_CUTLASS24_ARGS values, meta, x, y, out, tokens, in, device, sm_count, s, workspace, stream
  switch (tile_of(config)) {
    case 1: return bf16 ? gemm_bf16_1(LLMPRUNE_CUTLASS24_ARGS) : gemm_f16_1(LLMPRUNE_CUTLASS24_ARGS);
    case 2: return bf16 ? gemm_bf16_2(LLMPRUNE_CUTLASS24_ARGS) : gemm_f16_2(LLMPRUNE_CUTLASS24_ARGS);
    case 3: return bf16 ? gemm_bf16_3(LLMPRUNE_CUTLASS24_ARGS) : gemm_f16_3(LLMPRUNE_CUTLASS24_ARGS);
    case 4: return bf16 ? gemm_bf16_4(LLMPRUNE_CUTLASS24_ARGS) : gemm_f16_4(LLMPRUNE_CUTLASS24_ARGS);
    case 5: return bf16 ? gemm_bf16_5(LLMPRUNE_CUTLASS24_ARGS) : gemm_f16_5(LLMPRUNE_CUTLASS24_ARGS);
    case 6: return bf16 ? gemm_bf16_6(LLMPRUNE_CUTLASS24_ARGS) : gemm_f16_6(LLMPRUNE_CUTLASS24_ARGS);
    default: return bf16 ? gemm_bf16_0(LLMPRUNE_CUTLASS24_ARGS) : gemm_f16_0(LLMPRUNE_CUTLASS24_ARGS);
  }
#undef LLMPRUNE_CUTLASS24_ARGS
}

inline PackedSizes packed_sizes(bool bf16, int out, int in) {
  return bf16 ? packed_sizes_bf16(out, in) : packed_sizes_f16(out, in);
}

inline size_t compress_workspace(bool bf16, int out, int in, int device, int sm_count) {
  return bf16 ? compress_workspace_bf16(out, in, device, sm_count) : compress_workspace_f16(out, in, device, sm_count);
}

inline cudaError_t compress(bool bf16, const void* dense, void* values, void* meta, int out, int in, int device,
                            int sm_count, void* workspace, cudaStream_t stream) {
  return bf16 ? compress_bf16(dense, values, meta, out, in, device, sm_count, workspace, stream)
              : compress_f16(dense, values, meta, out, in, device, sm_count, workspace, stream);
}

}  // namespace llmprune::cutlass24
