// api.h's f16 entry points for tile config 9 (one translation unit each: parallel builds).
#include "sparse24/cutlass_sm90/kernels.cuh"

namespace llmprune::cutlass24 {
LLMPRUNE_CUTLASS24_DEFINE_GEMM(f16, cutlass::half_t, 9)
}  // namespace llmprune::cutlass24
