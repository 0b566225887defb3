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
  m.def("with_cutlass_sm90", &with_cutlass_sm90, "True when the CUTLASS sm90 2:4 GEMM was compiled in");
}
