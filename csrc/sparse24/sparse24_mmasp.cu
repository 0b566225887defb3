// The 16-bit 2:4 decode op on the sparse tensor cores (kernel: mmasp_kernel.cuh), the arch probe of this
// library's device code, and a one-MMA diagnostic.

#include "mmasp_launch.cuh"

#include <torch/library.h>

#include <map>
#include <mutex>

namespace llmprune {
namespace sparse24_mmasp {

__global__ void arch_kernel(int* out) {
#ifdef __CUDA_ARCH__
  *out = __CUDA_ARCH__;
#endif
}

}  // namespace sparse24_mmasp

// The __CUDA_ARCH__ of this library's device code as loaded on `device` (e.g. 800 for an Ampere build's PTX
// run on an H100, 900 for sm_90 code): what its kernels can use, whatever the GPU's compute capability.
int64_t code_arch(int64_t device) {
  static std::mutex lock;
  static std::map<int64_t, int64_t> cache;
  std::lock_guard<std::mutex> guard_lock(lock);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  int* d = nullptr;
  C10_CUDA_CHECK(cudaMalloc(&d, sizeof(int)));
  C10_CUDA_CHECK(cudaMemset(d, 0, sizeof(int)));
  sparse24_mmasp::arch_kernel<<<1, 1>>>(d);
  cudaError_t launched = cudaGetLastError();
  int value = 0;
  if (launched == cudaSuccess) C10_CUDA_CHECK(cudaMemcpy(&value, d, sizeof(int), cudaMemcpyDeviceToHost));
  C10_CUDA_CHECK(cudaFree(d));
  if (launched != cudaSuccess) value = 0;  // no code of this library runs on this GPU
  cache[device] = value;
  return value;
}

namespace sparse24_mmasp {

at::Tensor mmasp_linear(const at::Tensor& x_in, const at::Tensor& a_frag, const at::Tensor& e_frag, int64_t out_features,
                        const std::optional<at::Tensor>& bias, int64_t warps, int64_t rows_per_warp, int64_t splits) {
  TORCH_CHECK(x_in.is_cuda() && a_frag.is_cuda() && e_frag.is_cuda(), "sparse24_mmasp_linear: tensors must be on CUDA");
  check_inputs(x_in, a_frag, out_features, 8, 8);
  TORCH_CHECK(a_frag.scalar_type() == x_in.scalar_type(), "a_frag dtype ", a_frag.scalar_type(), " differs from x's ",
              x_in.scalar_type());
  return run<kQ16>(x_in, a_frag.data_ptr(), e_frag, nullptr, out_features, bias, warps, rows_per_warp, splits);
}

// Diagnostics: one warp runs a single mma.sp with the given per-lane registers.
template <bool BF16>
__global__ void probe_kernel(const uint32_t* a, const uint32_t* b, const uint32_t* e, int sel, float* d) {
  const int lane = threadIdx.x;
  const uint4 av = make_uint4(a[lane * 4], a[lane * 4 + 1], a[lane * 4 + 2], a[lane * 4 + 3]);
  uint32_t bv[4] = {b[lane * 4], b[lane * 4 + 1], b[lane * 4 + 2], b[lane * 4 + 3]};
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (sel == 0) mma_sp<BF16, 0>(acc, av, bv, e[lane]);
  else mma_sp<BF16, 1>(acc, av, bv, e[lane]);
  for (int r = 0; r < 4; ++r) d[lane * 4 + r] = acc[r];
}

at::Tensor mmasp_probe(const at::Tensor& a, const at::Tensor& b, const at::Tensor& e, int64_t selector, bool bf16) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda() && e.is_cuda(), "probe tensors must be on CUDA");
  TORCH_CHECK(a.scalar_type() == at::kInt && b.scalar_type() == at::kInt && e.scalar_type() == at::kInt,
              "probe registers must be int32");
  TORCH_CHECK(a.numel() == 128 && b.numel() == 128 && e.numel() == 32, "probe needs a/b [32, 4] and e [32]");
  TORCH_CHECK(selector == 0 || selector == 1, "selector must be 0 or 1, got ", selector);
  c10::cuda::CUDAGuard guard(a.device());
  auto ac = a.contiguous(), bc = b.contiguous(), ec = e.contiguous();
  at::Tensor d = at::empty({32, 4}, a.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* ap = reinterpret_cast<const uint32_t*>(ac.data_ptr());
  const auto* bp = reinterpret_cast<const uint32_t*>(bc.data_ptr());
  const auto* ep = reinterpret_cast<const uint32_t*>(ec.data_ptr());
  if (bf16) probe_kernel<true><<<1, 32, 0, stream>>>(ap, bp, ep, static_cast<int>(selector), d.data_ptr<float>());
  else probe_kernel<false><<<1, 32, 0, stream>>>(ap, bp, ep, static_cast<int>(selector), d.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return d;
}

}  // namespace sparse24_mmasp
}  // namespace llmprune

// Schemas: llmprune_kernels/library.py.
TORCH_LIBRARY_IMPL(llmprune_kernels, CUDA, m) {
  m.impl("sparse24_mmasp_linear", &llmprune::sparse24_mmasp::mmasp_linear);
  m.impl("sparse24_mmasp_probe", &llmprune::sparse24_mmasp::mmasp_probe);
}
