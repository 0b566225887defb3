// Python module entry of llmprune_kernels._C. Ops register their kernels with TORCH_LIBRARY_IMPL
// in their own files (callable as torch.ops.llmprune_kernels.<op>, so they work under
// torch.compile and CUDA graphs); this file only reports how the library was built.
#include <torch/extension.h>

bool with_cuda() {
#ifdef LLMPRUNE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool with_cusparselt() {
#ifdef LLMPRUNE_WITH_CUSPARSELT
  return true;
#else
  return false;
#endif
}

#ifdef LLMPRUNE_WITH_CUDA
namespace llmprune {
int64_t code_arch(int64_t device);  // csrc/sparse24/sparse24_mmasp.cu
}
#endif

// __CUDA_ARCH__ of the device code as loaded on GPU `device` (0: none of it runs there, or no CUDA build).
int64_t cuda_code_arch(int64_t device) {
#ifdef LLMPRUNE_WITH_CUDA
  return llmprune::code_arch(device);
#else
  (void)device;
  return 0;
#endif
}

bool with_cutlass_sm90() {
#ifdef LLMPRUNE_WITH_CUTLASS
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llmprune_kernels compiled ops (registered under torch.ops.llmprune_kernels)";
  m.def("with_cuda", &with_cuda, "True when the CUDA sources were compiled in");
  m.def("with_cusparselt", &with_cusparselt, "True when the cuSPARSELt path was compiled in");
  m.def("cuda_code_arch", &cuda_code_arch, "__CUDA_ARCH__ of the device code as loaded on a GPU (0: none)");
  m.def("with_cutlass_sm90", &with_cutlass_sm90, "True when the CUTLASS sm90 2:4 GEMM was compiled in");
}
