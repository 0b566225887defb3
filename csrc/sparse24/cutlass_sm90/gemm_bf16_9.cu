// api.h's bf16 entry points for tile config 9 (one translation unit each: parallel builds).
#include "sparse24/cutlass_sm90/kernels.cuh"

namespace llmprune::cutlass24 {
LLMPRUNE_CUTLASS24_DEFINE_GEMM(bf16, cutlass::bfloat16_t, 9)
}  // namespace llmprune::cutlass24
