// CUTLASS 3 structured-sparse (2:4) GEMM for Hopper (wgmma.sp, TMA, warp-specialised persistent
// kernels), for the large-M buckets where cuSPARSELt 0.8's bf16 kernels are barely faster than dense.
//
// Torch-free: the gemm_*.cu files here define api.h's entry points from it, so a standalone program can
// link the same files and build and time them without a CUDA torch.
//
// y[M, out] = x[M, in] @ W[out, in]^T is computed as the GEMM D = A B with A = W (structured, row-major,
// K-major), B = x^T (column-major, i.e. x row-major) and D = y^T column-major (i.e. y row-major), so no
// operand is copied. W is compressed by CUTLASS's own compressor (values + metadata in the order the
// sm90 wgmma.sp mainloop reads), once per metadata format: tiles with a 64-deep K step share format 0,
// those with a 128-deep one format 1 (FormatRef below).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/transform/device/transform_universal_adapter.hpp"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "sparse24/cutlass_sm90/api.h"

namespace llmprune::cutlass24 {

template <class Element, int TM, int TN, int TK, int CM, int CN, class TileScheduler = void, bool Pingpong = false>
struct SparseGemm {
  using ProblemShape = cute::Shape<int, int, int, int>;
  using LayoutTagA = cutlass::layout::RowMajor;
  using LayoutTagB = cutlass::layout::ColumnMajor;
  using LayoutTagD = cutlass::layout::ColumnMajor;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;
  using TileShape = cute::Shape<cute::Int<TM>, cute::Int<TN>, cute::Int<TK>>;
  using ClusterShape = cute::Shape<cute::Int<CM>, cute::Int<CN>, cute::_1>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutTagD, kAlign,  // no source C: beta is always 0
      Element, LayoutTagD, kAlign,
      std::conditional_t<Pingpong, cutlass::epilogue::TmaWarpSpecialized,
                         cutlass::epilogue::TmaWarpSpecializedCooperative>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, Element, LayoutTagA, kAlign, Element,
      LayoutTagB, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      std::conditional_t<Pingpong, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                         cutlass::gemm::KernelTmaWarpSpecializedCooperative>>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue, TileScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using SparseConfig = typename Mainloop::SparseConfig;
  using ElementE = typename Mainloop::ElementE;
  using StrideA = cutlass::gemm::TagToStrideA_t<LayoutTagA>;
  using StrideB = typename Kernel::StrideB;
  using StrideD = typename Kernel::StrideD;
  using CompressorUtility =
      cutlass::transform::kernel::StructuredSparseCompressorUtility<ProblemShape, Element, LayoutTagA, SparseConfig>;
  using CompressorKernel = cutlass::transform::kernel::StructuredSparseCompressor<ProblemShape, Element, LayoutTagA,
                                                                                  SparseConfig, cutlass::arch::Sm90>;
  using Compressor = cutlass::transform::device::TransformUniversalAdapter<CompressorKernel>;
};

template <class Element, int C>
struct ConfigOf;
// 0: 128x128 tiles, 2x1 cluster (shares B tiles between two M tiles); 1: 128x256 (large token
// counts); 2: 256x128 (large out features); 3: 256x128 with stream-K (splits the K loop of the last
// wave's tiles across SMs: 11008 rows make 43 tiles of 256, a partial last wave); 4: 256x128, 1x2 cluster;
// 5, 6: ping-pong schedules (two consumer warp groups take turns, one's epilogue overlapping the other's
// main loop: fewer tiles per SM at M = 2048 make the epilogue count), 128x128 and 64x256; 7: 256x128
// with stream-K and a 1x2 cluster (the two winners of the bf16 M >= 2048 sweep combined); 8: 256x128 with
// a 2x2 cluster (both operands multicast: half the L2 -> SMEM traffic of 2 and 4).
template <class E> struct ConfigOf<E, 0> { using T = SparseGemm<E, 128, 128, 64, 2, 1>; };
template <class E> struct ConfigOf<E, 1> { using T = SparseGemm<E, 128, 256, 64, 1, 2>; };
template <class E> struct ConfigOf<E, 2> { using T = SparseGemm<E, 256, 128, 64, 2, 1>; };
template <class E> struct ConfigOf<E, 3> { using T = SparseGemm<E, 256, 128, 64, 2, 1, cutlass::gemm::StreamKScheduler>; };
template <class E> struct ConfigOf<E, 4> { using T = SparseGemm<E, 256, 128, 64, 1, 2>; };
template <class E> struct ConfigOf<E, 5> { using T = SparseGemm<E, 128, 128, 64, 2, 1, void, true>; };
template <class E> struct ConfigOf<E, 6> { using T = SparseGemm<E, 64, 256, 64, 1, 2, void, true>; };
template <class E> struct ConfigOf<E, 7> { using T = SparseGemm<E, 256, 128, 64, 1, 2, cutlass::gemm::StreamKScheduler>; };
template <class E> struct ConfigOf<E, 8> { using T = SparseGemm<E, 256, 128, 64, 2, 2>; };
// 9-11: a K step of 128 (CUTLASS's generator halves sparse K tiles to 64 for more pipeline stages; at M >=
// 2048 on the H100 the deeper step measured 2-9% faster in bf16).
// They read metadata format 1 (CUTLASS's metadata atom spans min(TK, 128) columns).
template <class E> struct ConfigOf<E, 9> { using T = SparseGemm<E, 256, 128, 128, 1, 2>; };
template <class E> struct ConfigOf<E, 10> { using T = SparseGemm<E, 256, 128, 128, 1, 2, cutlass::gemm::StreamKScheduler>; };
template <class E> struct ConfigOf<E, 11> { using T = SparseGemm<E, 256, 128, 128, 2, 1>; };

// The reference tile of each metadata format (format_of_tile in api.h): every tile of a format reads
// the weight as that tile's compressor writes it.
template <class E, int Format>
using FormatRef = typename ConfigOf<E, Format == 0 ? 0 : 9>::T;

// can_implement, initialize, run: one CUTLASS device operator (GEMM or compressor) on `stream`.
template <class Op>
cudaError_t launch(typename Op::Arguments const& args, void* workspace, cudaStream_t stream) {
  Op op;
  cutlass::Status s = op.can_implement(args);
  if (s == cutlass::Status::kSuccess) s = op.initialize(args, workspace, stream);
  if (s == cutlass::Status::kSuccess) s = op.run(stream);
  return s == cutlass::Status::kSuccess ? cudaSuccess : cudaErrorInvalidValue;
}

// The compressor's problem for a weight [out, in] in a metadata format: the format's reference tile's
// types; the token count does not matter to compression.
template <class Element, int Format>
struct CompressProblem {
  using G = FormatRef<Element, Format>;
  typename G::ProblemShape shape;
  typename G::StrideA stride_a;
  CompressProblem(int out, int in)
      : shape{out, 8, in, 1},
        stride_a(cutlass::make_cute_packed_stride(typename G::StrideA{}, cute::make_shape(out, in, 1))) {}
};

template <class Element, int Format>
PackedSizes packed_sizes_t(int out, int in) {
  using G = typename CompressProblem<Element, Format>::G;
  CompressProblem<Element, Format> p(out, in);
  typename G::CompressorUtility util(p.shape, p.stride_a);
  PackedSizes s;
  s.values = int64_t(out) * util.get_tensorA_k_physical();
  s.meta_bytes = int64_t(util.get_metadata_m_physical()) * util.get_metadata_k_physical() *
                 int64_t(cutlass::sizeof_bits<typename G::ElementE>::value) / 8;
  return s;
}

// Compress a 2:4 weight [out, in] (row-major, contiguous) into values + metadata. The compressor kernel
// needs a workspace of compress_workspace() bytes.
template <class Element, int Format>
typename CompressProblem<Element, Format>::G::Compressor::Arguments compress_args(const void* dense, void* values,
                                                                                  void* meta, int out, int in,
                                                                                  int device, int sm_count) {
  using G = typename CompressProblem<Element, Format>::G;
  CompressProblem<Element, Format> p(out, in);
  cutlass::KernelHardwareInfo hw{device, sm_count};
  return {p.shape,
          {static_cast<const Element*>(dense), p.stride_a, static_cast<Element*>(values),
           static_cast<typename G::ElementE*>(meta)},
          {hw}};
}

template <class Element, int Format>
size_t compress_workspace_t(int out, int in, int device, int sm_count) {
  using G = typename CompressProblem<Element, Format>::G;
  return G::Compressor::get_workspace_size(
      compress_args<Element, Format>(nullptr, nullptr, nullptr, out, in, device, sm_count));
}

template <class Element, int Format>
cudaError_t compress_t(const void* dense, void* values, void* meta, int out, int in, int device, int sm_count,
                       void* workspace, cudaStream_t stream) {
  using G = typename CompressProblem<Element, Format>::G;
  return launch<typename G::Compressor>(
      compress_args<Element, Format>(dense, values, meta, out, in, device, sm_count), workspace, stream);
}

template <class G>
typename G::Gemm::Arguments gemm_args(const void* values, const void* meta, const void* x, void* y, int out,
                                      int tokens, int in, int device, int sm_count, Schedule sched) {
  typename G::ProblemShape shape{out, tokens, in, 1};
  auto layout_a = G::SparseConfig::fill_layoutA(shape);
  auto layout_e = G::SparseConfig::fill_layoutE(shape);
  auto stride_b = cutlass::make_cute_packed_stride(typename G::StrideB{}, cute::make_shape(tokens, in, 1));
  auto stride_d = cutlass::make_cute_packed_stride(typename G::StrideD{}, cute::make_shape(out, tokens, 1));
  using E = typename G::Mainloop::ElementA;  // sparse_elem wrapper type the mainloop expects
  cutlass::KernelHardwareInfo hw{device, sm_count};
  typename G::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      shape,
      {static_cast<const E*>(values), layout_a, static_cast<const typename G::Kernel::ElementB*>(x), stride_b,
       static_cast<const typename G::ElementE*>(meta), layout_e},
      {{1.0f, 0.0f}, nullptr, stride_d, static_cast<typename G::Kernel::ElementD*>(y), stride_d},
      hw};
  args.scheduler.max_swizzle_size = sched.swizzle;
  using RO = cutlass::gemm::kernel::detail::RasterOrderOptions;
  args.scheduler.raster_order = sched.raster == 1 ? RO::AlongM : sched.raster == 2 ? RO::AlongN : RO::Heuristic;
  return args;
}

template <class G>
size_t gemm_workspace_g(int out, int tokens, int in, int device, int sm_count, Schedule sched) {
  auto args = gemm_args<G>(nullptr, nullptr, nullptr, nullptr, out, tokens, in, device, sm_count, sched);
  return G::Gemm::get_workspace_size(args);
}

template <class G>
cudaError_t gemm_g(const void* values, const void* meta, const void* x, void* y, int out, int tokens, int in,
                   int device, int sm_count, Schedule sched, void* workspace, cudaStream_t stream) {
  return launch<typename G::Gemm>(gemm_args<G>(values, meta, x, y, out, tokens, in, device, sm_count, sched),
                                  workspace, stream);
}

// ---- definitions of api.h's entry points (one translation unit per dtype x config) ------------

#define LLMPRUNE_CUTLASS24_DEFINE_DTYPE(dt, Element)                                                        \
  PackedSizes packed_sizes_##dt(int format, int out, int in) {                                             \
    return format ? packed_sizes_t<Element, 1>(out, in) : packed_sizes_t<Element, 0>(out, in);             \
  }                                                                                                        \
  size_t compress_workspace_##dt(int format, int out, int in, int device, int sm_count) {                  \
    return format ? compress_workspace_t<Element, 1>(out, in, device, sm_count)                            \
                  : compress_workspace_t<Element, 0>(out, in, device, sm_count);                           \
  }                                                                                                        \
  cudaError_t compress_##dt(int format, const void* dense, void* values, void* meta, int out, int in,      \
                            int device, int sm_count, void* workspace, cudaStream_t stream) {              \
    return format ? compress_t<Element, 1>(dense, values, meta, out, in, device, sm_count, workspace, stream) \
                  : compress_t<Element, 0>(dense, values, meta, out, in, device, sm_count, workspace, stream); \
  }

#define LLMPRUNE_CUTLASS24_DEFINE_GEMM(dt, Element, cfg)                                                    \
  static_assert(std::is_same_v<typename ConfigOf<Element, cfg>::T::SparseConfig,                           \
                               typename FormatRef<Element, format_of_tile(cfg)>::SparseConfig>,            \
                "a tile must read the weight as its format's compressor writes it");                       \
  size_t gemm_workspace_##dt##_##cfg(int out, int tokens, int in, int device, int sm_count,               \
                                     Schedule sched) {                                                     \
    return gemm_workspace_g<typename ConfigOf<Element, cfg>::T>(out, tokens, in, device, sm_count, sched); \
  }                                                                                                        \
  cudaError_t gemm_##dt##_##cfg(const void* values, const void* meta, const void* x, void* y, int out,     \
                                int tokens, int in, int device, int sm_count, Schedule sched,              \
                                void* workspace, cudaStream_t stream) {                                    \
    return gemm_g<typename ConfigOf<Element, cfg>::T>(values, meta, x, y, out, tokens, in, device,         \
                                                      sm_count, sched, workspace, stream);                 \
  }

}  // namespace llmprune::cutlass24
