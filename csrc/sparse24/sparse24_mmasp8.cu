// The 8-bit 2:4 decode op: the mma.sp kernel of mmasp_kernel.cuh reading FP8 e4m3 or INT8 kept values, widened
// to the activations' fp16 / bf16 in registers, with one fp32 scale per output row applied to the accumulator.
// A fragments: [RB, NC*4, 32, 16] bytes, the 16-bit layout's per-lane order with k-steps 2j and 2j+1 in one
// 16-byte load (llmprune_kernels/sparse24/backends/mmasp8.py builds it).

#include "mmasp_launch.cuh"

#include <torch/library.h>

namespace llmprune {
namespace sparse24_mmasp {

at::Tensor mmasp8_linear(const at::Tensor& x_in, const at::Tensor& a_frag, const at::Tensor& e_frag,
                         const at::Tensor& scale, int64_t out_features, const std::optional<at::Tensor>& bias,
                         int64_t warps, int64_t rows_per_warp, int64_t splits) {
  TORCH_CHECK(x_in.is_cuda() && a_frag.is_cuda() && e_frag.is_cuda() && scale.is_cuda(),
              "sparse24_mmasp8_linear: tensors must be on CUDA");
  const auto qt = a_frag.scalar_type();
  TORCH_CHECK(qt == at::kFloat8_e4m3fn || qt == at::kChar, "a_frag must be float8_e4m3fn or int8, got ", qt);
  check_inputs(x_in, a_frag, out_features, 4, 16);
  const int64_t R = out_features;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == R && scale.is_contiguous(),
              "scale must be a contiguous float32 vector of ", R, " elements, got ", scale.scalar_type(), " ",
              scale.sizes());
  if (qt == at::kFloat8_e4m3fn) {
    return run<kQ8Fp8>(x_in, a_frag.data_ptr(), e_frag, scale.data_ptr<float>(), R, bias, warps, rows_per_warp,
                      splits);
  }
  return run<kQ8Int8>(x_in, a_frag.data_ptr(), e_frag, scale.data_ptr<float>(), R, bias, warps, rows_per_warp,
                     splits);
}

}  // namespace sparse24_mmasp
}  // namespace llmprune

// Schema: llmprune_kernels/library.py.
TORCH_LIBRARY_IMPL(llmprune_kernels, CUDA, m) {
  m.impl("sparse24_mmasp8_linear", &llmprune::sparse24_mmasp::mmasp8_linear);
}
