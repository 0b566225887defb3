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
// 5: 128x128x64, cluster 2x1, ping-pong; 6: 64x256x64, cluster 1x2, ping-pong;
// 7: 256x128x64, cluster 1x2, stream-K scheduler; 8: 256x128x64, cluster 2x2;
// 9: 256x128x128, cluster 1x2; 10: the same with stream-K; 11: 256x128x128, cluster 2x1.
// The metadata layout depends on the tile's K step: tiles 0-8 read format 0, tiles 9-11 format 1; a
// weight is compressed once per format it is used in (the values are the same, the metadata is 1/16 of
// a dense weight's bytes).
// The schedule is a runtime argument (no extra code): swizzle 1/2/4/8 tiles, raster 0 = CUTLASS's
// heuristic, 1 = along out (M), 2 = along tokens (N); it decides which tiles share L2 at a time.
constexpr int kTiles = 12;
constexpr int kFormats = 2;

constexpr int format_of_tile(int tile) { return tile >= 9 ? 1 : 0; }
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
  PackedSizes packed_sizes_##dt(int format, int out, int in);                                             \
  size_t compress_workspace_##dt(int format, int out, int in, int device, int sm_count);                  \
  cudaError_t compress_##dt(int format, const void* dense, void* values, void* meta, int out, int in,     \
                            int device, int sm_count, void* workspace, cudaStream_t stream);

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
LLMPRUNE_CUTLASS24_DECLARE_GEMM(f16, 7)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(f16, 8)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(f16, 9)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(f16, 10)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(f16, 11)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 0)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 1)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 2)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 3)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 4)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 5)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 6)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 7)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 8)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 9)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 10)
LLMPRUNE_CUTLASS24_DECLARE_GEMM(bf16, 11)

// One compiled tile's entry points, for a dtype (bf16 when `bf16`) and a config's tile.
struct GemmEntry {
  size_t (*workspace)(int out, int tokens, int in, int device, int sm_count, Schedule sched);
  cudaError_t (*run)(const void* values, const void* meta, const void* x, void* y, int out, int tokens, int in,
                     int device, int sm_count, Schedule sched, void* workspace, cudaStream_t stream);
};

inline GemmEntry gemm_entry(bool bf16, int config) {
#define LLMPRUNE_CUTLASS24_ENTRY(cfg)                                                      \
  case cfg:                                                                                \
    return bf16 ? GemmEntry{gemm_workspace_bf16_##cfg, gemm_bf16_##cfg}                    \
                : GemmEntry{gemm_workspace_f16_##cfg, gemm_f16_##cfg};
  switch (tile_of(config)) {
    LLMPRUNE_CUTLASS24_ENTRY(1)
    LLMPRUNE_CUTLASS24_ENTRY(2)
    LLMPRUNE_CUTLASS24_ENTRY(3)
    LLMPRUNE_CUTLASS24_ENTRY(4)
    LLMPRUNE_CUTLASS24_ENTRY(5)
    LLMPRUNE_CUTLASS24_ENTRY(6)
    LLMPRUNE_CUTLASS24_ENTRY(7)
    LLMPRUNE_CUTLASS24_ENTRY(8)
    LLMPRUNE_CUTLASS24_ENTRY(9)
    LLMPRUNE_CUTLASS24_ENTRY(10)
    LLMPRUNE_CUTLASS24_ENTRY(11)
    default: LLMPRUNE_CUTLASS24_ENTRY(0)
  }
#undef LLMPRUNE_CUTLASS24_ENTRY
}

inline size_t gemm_workspace(bool bf16, int config, int out, int tokens, int in, int device, int sm_count) {
  return gemm_entry(bf16, config).workspace(out, tokens, in, device, sm_count, schedule_of(config));
}

inline cudaError_t gemm(bool bf16, int config, const void* values, const void* meta, const void* x, void* y, int out,
                        int tokens, int in, int device, int sm_count, void* workspace, cudaStream_t stream) {
  return gemm_entry(bf16, config).run(values, meta, x, y, out, tokens, in, device, sm_count, schedule_of(config),
                                      workspace, stream);
}

inline PackedSizes packed_sizes(bool bf16, int format, int out, int in) {
  return bf16 ? packed_sizes_bf16(format, out, in) : packed_sizes_f16(format, out, in);
}

inline size_t compress_workspace(bool bf16, int format, int out, int in, int device, int sm_count) {
  return bf16 ? compress_workspace_bf16(format, out, in, device, sm_count)
              : compress_workspace_f16(format, out, in, device, sm_count);
}

inline cudaError_t compress(bool bf16, int format, const void* dense, void* values, void* meta, int out, int in,
                            int device, int sm_count, void* workspace, cudaStream_t stream) {
  return bf16 ? compress_bf16(format, dense, values, meta, out, in, device, sm_count, workspace, stream)
              : compress_f16(format, dense, values, meta, out, in, device, sm_count, workspace, stream);
}

}  // namespace llmprune::cutlass24
