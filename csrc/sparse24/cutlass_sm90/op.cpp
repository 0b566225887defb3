// Torch ops of the CUTLASS sm90 2:4 GEMM (api.h): compress a 2:4 weight once into CUTLASS's values +
// metadata (in the metadata format of the tiles that will read it), then y = x @ W^T (+ bias) with a
// chosen tile config. The call builds its TMA descriptors on
// the host (a few microseconds) and launches one persistent kernel; nothing is cached or synchronised,
// so it works in eager mode and inside CUDA graphs. Inputs are validated in Python
// (llmprune_kernels/sparse24/backends/cutlass_sm90.py) and again here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "sparse24/cutlass_sm90/api.h"

namespace {

using namespace llmprune::cutlass24;

int attribute(cudaDeviceAttr what, int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, what, device));
  return v;
}

int sm_count(int device) { return attribute(cudaDevAttrMultiProcessorCount, device); }

bool is_bf16(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "CUTLASS 2:4 GEMM needs float16 or bfloat16 tensors, got ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16;
}

void check_device(const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "CUTLASS 2:4 GEMM needs CUDA tensors, got one on ", t.device());
  const int major = attribute(cudaDevAttrComputeCapabilityMajor, t.get_device());
  const int minor = attribute(cudaDevAttrComputeCapabilityMinor, t.get_device());
  TORCH_CHECK(major == 9 && minor == 0, "CUTLASS 2:4 GEMM is built for sm_90a (H100/H200), got sm_", major, minor);
}

void check_shape(int64_t out, int64_t in) {
  TORCH_CHECK(out > 0 && in > 0 && out % 8 == 0 && in % 16 == 0 && out < (1LL << 31) && in < (1LL << 31),
              "CUTLASS 2:4 GEMM needs out_features % 8 == 0 and in_features % 16 == 0, got out=", out, ", in=", in);
}

at::Tensor workspace_of(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, like.options().dtype(at::kByte));
}

std::vector<at::Tensor> cutlass_compress(const at::Tensor& weight, int64_t format) {
  check_device(weight);
  TORCH_CHECK(format >= 0 && format < kFormats, "CUTLASS 2:4 metadata format must be in [0, ", kFormats, "), got ",
              format);
  TORCH_CHECK(weight.dim() == 2, "CUTLASS 2:4 compress needs a 2-D weight, got ", weight.dim(), " dims");
  bool bf16 = is_bf16(weight);
  const int64_t out = weight.size(0), in = weight.size(1);
  check_shape(out, in);
  c10::cuda::CUDAGuard guard(weight.device());
  auto w = weight.contiguous();
  const int dev = w.get_device(), sms = sm_count(dev);
  PackedSizes ps = packed_sizes(bf16, int(format), out, in);
  auto values = at::zeros({ps.values}, w.options());
  auto meta = at::zeros({ps.meta_bytes}, w.options().dtype(at::kByte));
  auto ws = workspace_of(compress_workspace(bf16, int(format), out, in, dev, sms), w);
  cudaError_t e = compress(bf16, int(format), w.data_ptr(), values.data_ptr(), meta.data_ptr(), out, in, dev, sms, ws.data_ptr(),
                           c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(e == cudaSuccess, "CUTLASS 2:4 compress failed for a ", out, "x", in, " weight: ", cudaGetErrorString(e));
  return {values, meta};
}

at::Tensor cutlass_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta, int64_t out_features,
                          const std::optional<at::Tensor>& bias, int64_t config) {
  check_device(x);
  TORCH_CHECK(x.dim() == 2, "CUTLASS 2:4 linear needs x of shape [M, in], got ", x.sizes());
  bool bf16 = is_bf16(x);
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "CUTLASS 2:4 linear: x is ", x.scalar_type(),
              " but the weight is ", values.scalar_type());
  TORCH_CHECK(values.device() == x.device() && meta.device() == x.device(),
              "CUTLASS 2:4 linear: x, values and meta must be on one device");
  TORCH_CHECK(config >= 0 && config < kConfigs, "CUTLASS 2:4 tile config must be in [0, ", kConfigs, "), got ", config);
  const int64_t m = x.size(0), in = x.size(1);
  check_shape(out_features, in);
  PackedSizes ps = packed_sizes(bf16, format_of_tile(tile_of(int(config))), out_features, in);
  TORCH_CHECK(values.numel() == ps.values && meta.numel() == ps.meta_bytes,
              "CUTLASS 2:4 linear: compressed weight does not match out_features=", out_features, ", in=", in,
              " in the metadata format of config ", config);
  c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({m, out_features}, x.options());
  if (m > 0) {
    TORCH_CHECK(m < (1LL << 31), "CUTLASS 2:4 linear: M=", m, " is too large");
    // TMA reads x row-major with 16-byte aligned rows and base
    at::Tensor xc = x.contiguous();
    if (reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16 != 0) xc = xc.clone();
    const int dev = xc.get_device(), sms = sm_count(dev);
    size_t wsb = gemm_workspace(bf16, config, out_features, m, in, dev, sms);
    at::Tensor ws = wsb ? workspace_of(wsb, xc) : at::Tensor();
    cudaError_t e = gemm(bf16, config, values.data_ptr(), meta.data_ptr(), xc.data_ptr(), y.data_ptr(), out_features,
                         m, in, dev, sms, wsb ? ws.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(e == cudaSuccess, "CUTLASS 2:4 GEMM (config ", config, ") cannot run ", out_features, "x", in, " at M=",
                m, ": ", cudaGetErrorString(e));
  }
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

}  // namespace

// Schemas: llmprune_kernels/library.py.
TORCH_LIBRARY_IMPL(llmprune_kernels, CUDA, m) {
  m.impl("sparse24_cutlass_compress", &cutlass_compress);
  m.impl("sparse24_cutlass_linear", &cutlass_linear);
}
