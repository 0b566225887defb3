// Host side of the mma.sp decode kernel (mmasp_kernel.cuh): the input checks and the launch that the 16-bit op
// (sparse24_mmasp.cu) and the 8-bit one (sparse24_mmasp8.cu) share.

#pragma once

#include "mmasp_kernel.cuh"

#include <optional>

namespace llmprune {
namespace sparse24_mmasp {

template <typename T, bool BF16, int NT, int WR, int Q8>
void launch(const Params& p, int warps, dim3 grid, size_t smem, cudaStream_t stream) {
  auto kernel = mmasp_kernel<T, BF16, NT, WR, Q8>;
  static size_t smem_set = 48 * 1024;  // per template instance; only ever raised
  if (smem > smem_set) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    smem_set = smem;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(warps * 32, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = p.splits;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = p.splits > 1 ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
}

// One template instance per (NT, WR): one or two n8 token tiles, one or two row blocks a warp.
template <typename T, bool BF16, int Q8>
void dispatch(const Params& p, int nt, int wr, int warps, dim3 grid, size_t smem, cudaStream_t stream) {
  if (nt == 1 && wr == 1) launch<T, BF16, 1, 1, Q8>(p, warps, grid, smem, stream);
  else if (nt == 1) launch<T, BF16, 1, 2, Q8>(p, warps, grid, smem, stream);
  else if (wr == 1) launch<T, BF16, 2, 1, Q8>(p, warps, grid, smem, stream);
  else launch<T, BF16, 2, 2, Q8>(p, warps, grid, smem, stream);
}

// The input checks both ops share: x [M, in] fp16 / bf16 with M in 1..16, in a positive multiple of 4, out > 0,
// and a_frag contiguous [ceil(out/16), ceil(in/256) * ka, 32, width] (16-bit values: ka 8, width 8 elements;
// 8-bit: ka 4, width 16 bytes).
inline void check_inputs(const at::Tensor& x_in, const at::Tensor& a_frag, int64_t R, int64_t ka, int64_t width) {
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [M, in], got ", x_in.dim(), " dims");
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, "x must be float16 or bfloat16, got ", dt);
  const int64_t M = x_in.size(0), K = x_in.size(1);
  TORCH_CHECK(M >= 1 && M <= 16, "M (rows of x) must be in 1..16, got ", M);
  TORCH_CHECK(K > 0 && K % 4 == 0, "in_features must be a positive multiple of 4, got ", K);
  TORCH_CHECK(R > 0, "out_features must be positive, got ", R);
  const int64_t RB = (R + 15) / 16, NC = (K + kChunk - 1) / kChunk;
  TORCH_CHECK(a_frag.dim() == 4 && a_frag.size(0) == RB && a_frag.size(1) == NC * ka && a_frag.size(2) == 32 &&
                  a_frag.size(3) == width && a_frag.is_contiguous(),
              "a_frag must be contiguous [", RB, ", ", NC * ka, ", 32, ", width, "] for out=", R, ", in=", K, ", got ",
              a_frag.sizes());
}

// The launch shared by the 16-bit op (sparse24_mmasp.cu) and the 8-bit one (sparse24_mmasp8.cu), after each
// has checked its A fragments (`a`) and scales: checks of x, e_frag, bias and the config, then one launch.
template <int Q8>
at::Tensor run(const at::Tensor& x_in, const void* a, const at::Tensor& e_frag, const float* scale, int64_t R,
               const std::optional<at::Tensor>& bias, int64_t warps, int64_t rows_per_warp, int64_t splits) {
  const auto dt = x_in.scalar_type();
  const int64_t M = x_in.size(0), K = x_in.size(1);
  const int64_t RB = (R + 15) / 16, NC = (K + kChunk - 1) / kChunk;
  TORCH_CHECK(e_frag.scalar_type() == at::kInt, "e_frag must be int32, got ", e_frag.scalar_type());
  TORCH_CHECK(e_frag.dim() == 4 && e_frag.size(0) == RB && e_frag.size(1) == NC && e_frag.size(2) == 32 &&
                  e_frag.size(3) == 4 && e_frag.is_contiguous(),
              "e_frag must be contiguous [", RB, ", ", NC, ", 32, 4], got ", e_frag.sizes());
  TORCH_CHECK(warps == 4 || warps == 8, "warps must be 4 or 8, got ", warps);
  TORCH_CHECK(rows_per_warp == 1 || rows_per_warp == 2, "rows_per_warp must be 1 or 2, got ", rows_per_warp);
  TORCH_CHECK(splits == 1 || splits == 2 || splits == 4 || splits == 8, "splits must be 1, 2, 4 or 8, got ", splits);
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == dt && bias->dim() == 1 && bias->size(0) == R,
                "bias must be a CUDA ", dt, " vector of ", R, " elements");
  }
  c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t arch = code_arch(x_in.get_device());
  TORCH_CHECK(arch >= 800, "sparse24_mmasp_linear needs code for sm_80 or newer, this GPU runs sm_", arch / 10);
  TORCH_CHECK(splits == 1 || arch >= 900, "splits > 1 needs thread-block clusters (sm_90 code); this build runs sm_",
              arch / 10, " code on this GPU: use splits=1, got ", splits);
  TORCH_CHECK(Q8 != kQ8Fp8 || arch >= 890, "FP8 e4m3 values need code for sm_89 or newer; this build runs sm_",
              arch / 10, " code on this GPU: use INT8 values");
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, x_in.get_device()));
  // 8-byte loads of x rows: unit stride, 8-byte aligned start and row stride.
  at::Tensor x = x_in;
  if (x.stride(1) != 1 || (x.stride(0) * 2) % 8 != 0 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 8 != 0) {
    x = x_in.contiguous().clone();
  }
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, R}, x.options());

  const int nt = M <= 8 ? 1 : 2;
  const int kslice = static_cast<int>((NC + splits - 1) / splits);
  const int stride = kslice * kChunk + 8;
  const size_t xs_bytes = (static_cast<size_t>(nt) * 8 * stride * 2 + 15) & ~static_cast<size_t>(15);
  const int rows_cta = static_cast<int>(warps * rows_per_warp * 16);
  const size_t smem = xs_bytes + static_cast<size_t>(rows_cta) * nt * 8 * 4;
  TORCH_CHECK(smem <= static_cast<size_t>(smem_optin), "shared memory ", smem, " bytes exceeds the GPU's ", smem_optin,
              " (in=", K, ", splits=", splits, "): use more splits");
  Params p;
  p.a = reinterpret_cast<const uint4*>(a);
  p.e = reinterpret_cast<const uint4*>(e_frag.data_ptr());
  p.x = x.data_ptr();
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.scale = scale;
  p.y = y.data_ptr();
  p.M = static_cast<int>(M);
  p.K = static_cast<int>(K);
  p.R = static_cast<int>(R);
  p.RB = static_cast<int>(RB);
  p.NC = static_cast<int>(NC);
  p.splits = static_cast<int>(splits);
  p.kslice = kslice;
  p.x_stride = x.stride(0);
  p.x16 = K % 8 == 0 && (x.stride(0) * 2) % 16 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  const int tiles = static_cast<int>((RB + warps * rows_per_warp - 1) / (warps * rows_per_warp));
  const dim3 grid(tiles, static_cast<unsigned>(splits), 1);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (dt == at::kHalf) {
    dispatch<__half, false, Q8>(p, nt, static_cast<int>(rows_per_warp), static_cast<int>(warps), grid, smem, stream);
  } else {
    dispatch<__nv_bfloat16, true, Q8>(p, nt, static_cast<int>(rows_per_warp), static_cast<int>(warps), grid, smem, stream);
  }
  return y;
}


}  // namespace sparse24_mmasp
}  // namespace llmprune
