// cuSPARSELt 2:4 linear with compress-once weights and cached plans.
//
// torch's own _cslt_sparse_mm builds descriptors, a plan and a workspace on every call (the ~1 ms of
// setup that makes eager 2:4 slower than dense). Here the weight is compressed once
// (sparse24_cslt_compress) and plans live in a process-wide cache keyed by
// (device, dtype, out, in, padded M, algorithm config): every layer of one shape shares them, and an
// eager call after the first pays only cusparseLtMatmul. The algorithm is picked at tuning time by
// timing every config id (sparse24_cslt_max_alg_id + Python), so nothing is searched or synchronised
// while a CUDA graph is being captured. sparse24_cslt_search (cusparseLtMatmulSearch) is kept for
// experiments only: with cuSPARSELt 0.8 on the H100 it crashed the process (segfault) for this layout.
//
// Layout: y[M, out] = x[M, in] @ W[out, in]^T always reads W row-major, x row-major [M, in] and writes y
// row-major [M, out]. The `layout` argument (0..7) only changes how cuSPARSELt is told this, which changes
// the kernels it offers: 0..3 make W the structured A operand (D = op(A) op(B) column-major [out, M]),
// 4..7 make W the structured B operand (D row-major [M, out]); within each half the two operands are
// described row- or column-major (with the matching op). Layout 0 (A = W row-major, B = x transposed) is
// torch's transpose_result=True. A weight compressed for one layout must be used with that layout.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cusparseLt.h>

#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

namespace {

#define CSLT_CHECK(call)                                                                          \
  do {                                                                                            \
    cusparseStatus_t status_ = (call);                                                            \
    TORCH_CHECK(status_ == CUSPARSE_STATUS_SUCCESS, "cuSPARSELt call ", #call, " failed: ",       \
                cusparseLtGetErrorString(status_), " (", static_cast<int>(status_), ")");         \
  } while (0)

// cuSPARSELt wants every dimension of the dense operand aligned; padding M to 16 rows is always
// accepted (for fp16/bf16) and costs a copy only for M not already a multiple of 16.
constexpr int64_t kRowAlign = 16;

std::mutex g_mutex;
std::map<int, std::unique_ptr<cusparseLtHandle_t>> g_handles;

cusparseLtHandle_t* handle_for(int device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_handles.find(device);
  if (it != g_handles.end()) return it->second.get();
  auto h = std::make_unique<cusparseLtHandle_t>();
  CSLT_CHECK(cusparseLtInit(h.get()));
  auto* raw = h.get();
  g_handles.emplace(device, std::move(h));  // never destroyed: lives as long as the CUDA context
  return raw;
}

cudaDataType cuda_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default:
      TORCH_CHECK(false, "cuSPARSELt 2:4 needs float16 or bfloat16 tensors, got ", t.scalar_type());
  }
}

constexpr int64_t kLayouts = 8;

bool weight_is_a(int64_t layout) { return layout < 4; }

// W [out, in] row-major described either as such (op T when it is B) or as W^T [in, out] column-major.
bool weight_row_major(int64_t layout) { return layout == 0 || layout == 1 || layout == 6 || layout == 7; }

// x [M, in] row-major described either as such or as x^T [in, M] column-major.
bool x_row_major(int64_t layout) { return layout == 0 || layout == 3 || layout == 4 || layout == 6; }

cusparseOperation_t weight_op(int64_t layout) {
  // op(A) must be [out, in] (A = W); op(B) must be [in, out] (B = W)
  bool transpose = weight_is_a(layout) ? !weight_row_major(layout) : weight_row_major(layout);
  return transpose ? CUSPARSE_OPERATION_TRANSPOSE : CUSPARSE_OPERATION_NON_TRANSPOSE;
}

cusparseOperation_t x_op(int64_t layout) {
  // op(B) must be [in, M] (B = x); op(A) must be [M, in] (A = x)
  bool transpose = weight_is_a(layout) ? x_row_major(layout) : !x_row_major(layout);
  return transpose ? CUSPARSE_OPERATION_TRANSPOSE : CUSPARSE_OPERATION_NON_TRANSPOSE;
}

// cuSPARSELt's A and B pointers for a matmul: the compressed weight is A for layouts 0..3, B for 4..7.
std::pair<const void*, const void*> operands(int64_t layout, const at::Tensor& compressed, const at::Tensor& x) {
  if (weight_is_a(layout)) return {compressed.data_ptr(), x.data_ptr()};
  return {x.data_ptr(), compressed.data_ptr()};
}

void check_layout(int64_t layout) {
  TORCH_CHECK(layout >= 0 && layout < kLayouts, "sparse24_cslt: layout must be in [0, ", kLayouts, "), got ", layout);
}

void init_weight_desc(cusparseLtHandle_t* h, cusparseLtMatDescriptor_t* d, int64_t out, int64_t in,
                      cudaDataType type, int64_t layout) {
  if (weight_row_major(layout)) {
    CSLT_CHECK(cusparseLtStructuredDescriptorInit(h, d, out, in, in, 16, type, CUSPARSE_ORDER_ROW,
                                                  CUSPARSELT_SPARSITY_50_PERCENT));
  } else {
    CSLT_CHECK(cusparseLtStructuredDescriptorInit(h, d, in, out, in, 16, type, CUSPARSE_ORDER_COL,
                                                  CUSPARSELT_SPARSITY_50_PERCENT));
  }
}

// Descriptors of x, y and the weight, and the matmul descriptor, for one layout.
void init_matmul(cusparseLtHandle_t* h, cusparseLtMatDescriptor_t* w, cusparseLtMatDescriptor_t* x,
                 cusparseLtMatDescriptor_t* y, cusparseLtMatmulDescriptor_t* matmul, cudaDataType type,
                 int64_t out, int64_t in, int64_t m, int64_t layout) {
  init_weight_desc(h, w, out, in, type, layout);
  if (x_row_major(layout)) {
    CSLT_CHECK(cusparseLtDenseDescriptorInit(h, x, m, in, in, 16, type, CUSPARSE_ORDER_ROW));
  } else {
    CSLT_CHECK(cusparseLtDenseDescriptorInit(h, x, in, m, in, 16, type, CUSPARSE_ORDER_COL));
  }
  if (weight_is_a(layout)) {  // D = op(W) op(x) = y^T [out, M], column-major is y row-major
    CSLT_CHECK(cusparseLtDenseDescriptorInit(h, y, out, m, out, 16, type, CUSPARSE_ORDER_COL));
    CSLT_CHECK(cusparseLtMatmulDescriptorInit(h, matmul, weight_op(layout), x_op(layout), w, x, y, y,
                                              CUSPARSE_COMPUTE_32F));
  } else {  // D = op(x) op(W) = y [M, out] row-major
    CSLT_CHECK(cusparseLtDenseDescriptorInit(h, y, m, out, out, 16, type, CUSPARSE_ORDER_ROW));
    CSLT_CHECK(cusparseLtMatmulDescriptorInit(h, matmul, x_op(layout), weight_op(layout), x, w, y, y,
                                              CUSPARSE_COMPUTE_32F));
  }
}

struct AlgConfig {
  int64_t alg_id = -1;  // -1: library default
  int64_t split_k = -1;
  int64_t split_k_mode = -1;
  int64_t split_k_buffers = -1;
};

struct Plan {
  cusparseLtMatDescriptor_t a, b, d;  // a: the weight, b: x, d: y (whichever operand cuSPARSELt calls them)
  cusparseLtMatmulDescriptor_t matmul;
  cusparseLtMatmulAlgSelection_t alg_sel;
  cusparseLtMatmulPlan_t plan;
  size_t workspace = 0;
};

using PlanKey = std::tuple<int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;
std::map<PlanKey, std::unique_ptr<Plan>> g_plans;

void set_alg(cusparseLtHandle_t* h, Plan* p, const AlgConfig& cfg) {
  if (cfg.alg_id >= 0) {
    int v = static_cast<int>(cfg.alg_id);
    CSLT_CHECK(cusparseLtMatmulAlgSetAttribute(h, &p->alg_sel, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &v, sizeof(v)));
  }
  if (cfg.split_k > 0) {
    int v = static_cast<int>(cfg.split_k);
    CSLT_CHECK(cusparseLtMatmulAlgSetAttribute(h, &p->alg_sel, CUSPARSELT_MATMUL_SPLIT_K, &v, sizeof(v)));
    if (cfg.split_k > 1 && cfg.split_k_mode > 0) {
      int mode = static_cast<int>(cfg.split_k_mode);
      CSLT_CHECK(cusparseLtMatmulAlgSetAttribute(h, &p->alg_sel, CUSPARSELT_MATMUL_SPLIT_K_MODE, &mode, sizeof(mode)));
    }
    if (cfg.split_k > 1 && cfg.split_k_buffers > 0) {
      int buf = static_cast<int>(cfg.split_k_buffers);
      CSLT_CHECK(cusparseLtMatmulAlgSetAttribute(h, &p->alg_sel, CUSPARSELT_MATMUL_SPLIT_K_BUFFERS, &buf, sizeof(buf)));
    }
  }
}

std::unique_ptr<Plan> make_plan(cusparseLtHandle_t* h, cudaDataType type, int64_t out, int64_t in, int64_t m,
                                const AlgConfig& cfg, int64_t layout) {
  auto p = std::make_unique<Plan>();
  init_matmul(h, &p->a, &p->b, &p->d, &p->matmul, type, out, in, m, layout);
  CSLT_CHECK(cusparseLtMatmulAlgSelectionInit(h, &p->alg_sel, &p->matmul, CUSPARSELT_MATMUL_ALG_DEFAULT));
  set_alg(h, p.get(), cfg);
  CSLT_CHECK(cusparseLtMatmulPlanInit(h, &p->plan, &p->matmul, &p->alg_sel));
  CSLT_CHECK(cusparseLtMatmulGetWorkspace(h, &p->plan, &p->workspace));
  return p;
}

void check_inputs(const at::Tensor& x, const at::Tensor& compressed, int64_t out) {
  TORCH_CHECK(x.is_cuda() && compressed.is_cuda(), "sparse24_cslt: x and the compressed weight must be CUDA tensors");
  TORCH_CHECK(x.device() == compressed.device(), "sparse24_cslt: x on ", x.device(), ", weight on ", compressed.device());
  TORCH_CHECK(x.dim() == 2, "sparse24_cslt: x must be 2-D [M, in], got ", x.sizes());
  TORCH_CHECK(compressed.scalar_type() == at::kByte && compressed.dim() == 1,
              "sparse24_cslt: the compressed weight must be the 1-D uint8 tensor from sparse24_cslt_compress");
  TORCH_CHECK(out > 0 && out % 32 == 0 && x.size(1) % 64 == 0,
              "sparse24_cslt: needs out_features % 32 == 0 and in_features % 64 == 0, got ", out, " x ", x.size(1));
}

at::Tensor pad_rows(const at::Tensor& x, int64_t* m_pad) {
  int64_t m = x.size(0);
  *m_pad = (m + kRowAlign - 1) / kRowAlign * kRowAlign;
  at::Tensor xc = x.contiguous();
  if (*m_pad == m) return xc;
  return at::constant_pad_nd(xc, {0, 0, 0, *m_pad - m}, 0);
}

Plan* cached_plan(const at::Tensor& x, int64_t out, int64_t m_pad, const AlgConfig& cfg, int64_t layout) {
  int dev = x.get_device();
  PlanKey key{dev, static_cast<int>(x.scalar_type()), out, x.size(1), m_pad, cfg.alg_id, cfg.split_k,
              cfg.split_k_mode, cfg.split_k_buffers, layout};
  auto* h = handle_for(dev);
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_plans.find(key);
  if (it != g_plans.end()) return it->second.get();
  auto p = make_plan(h, cuda_type(x), out, x.size(1), m_pad, cfg, layout);
  auto* raw = p.get();
  g_plans.emplace(key, std::move(p));
  return raw;
}

at::Tensor cslt_compress(const at::Tensor& w, int64_t layout) {
  check_layout(layout);
  TORCH_CHECK(w.is_cuda() && w.dim() == 2, "sparse24_cslt_compress: needs a 2-D CUDA weight, got ", w.sizes());
  TORCH_CHECK(w.size(0) % 32 == 0 && w.size(1) % 64 == 0,
              "sparse24_cslt_compress: needs out_features % 32 == 0 and in_features % 64 == 0, got ", w.sizes());
  c10::cuda::CUDAGuard guard(w.device());
  auto* h = handle_for(w.get_device());
  at::Tensor wc = w.contiguous();
  cusparseLtMatDescriptor_t desc;
  init_weight_desc(h, &desc, w.size(0), w.size(1), cuda_type(w), layout);
  size_t size = 0, buffer_size = 0;
  CSLT_CHECK(cusparseLtSpMMACompressedSize2(h, &desc, &size, &buffer_size));
  auto opts = w.options().dtype(at::kByte);
  at::Tensor compressed = at::empty({static_cast<int64_t>(size)}, opts);
  at::Tensor buffer = at::empty({static_cast<int64_t>(std::max<size_t>(buffer_size, 1))}, opts);
  CSLT_CHECK(cusparseLtSpMMACompress2(h, &desc, weight_is_a(layout) ? 1 : 0, weight_op(layout), wc.data_ptr(),
                                      compressed.data_ptr(), buffer.data_ptr(),
                                      c10::cuda::getCurrentCUDAStream()));
  CSLT_CHECK(cusparseLtMatDescriptorDestroy(&desc));
  return compressed;
}

at::Tensor cslt_linear(const at::Tensor& x, const at::Tensor& compressed, int64_t out,
                       const std::optional<at::Tensor>& bias, int64_t alg_id, int64_t split_k,
                       int64_t split_k_mode, int64_t split_k_buffers, int64_t layout) {
  check_inputs(x, compressed, out);
  check_layout(layout);
  c10::cuda::CUDAGuard guard(x.device());
  int64_t m = x.size(0), m_pad = 0;
  if (m == 0) return at::empty({0, out}, x.options());
  at::Tensor xp = pad_rows(x, &m_pad);
  Plan* p = cached_plan(xp, out, m_pad, AlgConfig{alg_id, split_k, split_k_mode, split_k_buffers}, layout);
  auto* h = handle_for(x.get_device());
  at::Tensor y = at::empty({m_pad, out}, x.options());
  at::Tensor ws = at::empty({static_cast<int64_t>(std::max<size_t>(p->workspace, 1))}, x.options().dtype(at::kByte));
  float alpha = 1.0f, beta = 0.0f;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto [da, db] = operands(layout, compressed, xp);
  CSLT_CHECK(cusparseLtMatmul(h, &p->plan, &alpha, da, db, &beta, y.data_ptr(), y.data_ptr(), ws.data_ptr(),
                              &stream, 1));
  if (m_pad != m) y = y.narrow(0, 0, m);  // leading rows of a row-major matrix: still contiguous
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

std::vector<int64_t> cslt_search(const at::Tensor& x, const at::Tensor& compressed, int64_t out, int64_t layout) {
  check_inputs(x, compressed, out);
  check_layout(layout);
  c10::cuda::CUDAGuard guard(x.device());
  int64_t m_pad = 0;
  at::Tensor xp = pad_rows(x, &m_pad);
  auto* h = handle_for(x.get_device());
  auto p = make_plan(h, cuda_type(x), out, x.size(1), m_pad, AlgConfig{}, layout);
  at::Tensor y = at::empty({m_pad, out}, x.options());
  at::Tensor ws = at::empty({static_cast<int64_t>(std::max<size_t>(p->workspace, 1))}, x.options().dtype(at::kByte));
  float alpha = 1.0f, beta = 0.0f;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto [da, db] = operands(layout, compressed, xp);
  CSLT_CHECK(cusparseLtMatmulSearch(h, &p->plan, &alpha, da, db, &beta, y.data_ptr(), y.data_ptr(), ws.data_ptr(),
                                    &stream, 1));
  int alg = 0, max_alg = 0, split_k = 1, split_k_mode = 0, split_k_buffers = 0;
  CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(h, &p->alg_sel, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg, sizeof(alg)));
  CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(h, &p->alg_sel, CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID, &max_alg, sizeof(max_alg)));
  CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(h, &p->alg_sel, CUSPARSELT_MATMUL_SPLIT_K, &split_k, sizeof(split_k)));
  if (split_k > 1) {
    CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(h, &p->alg_sel, CUSPARSELT_MATMUL_SPLIT_K_MODE, &split_k_mode, sizeof(split_k_mode)));
    CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(h, &p->alg_sel, CUSPARSELT_MATMUL_SPLIT_K_BUFFERS, &split_k_buffers, sizeof(split_k_buffers)));
  }
  CSLT_CHECK(cusparseLtMatmulPlanDestroy(&p->plan));
  CSLT_CHECK(cusparseLtMatmulAlgSelectionDestroy(&p->alg_sel));
  CSLT_CHECK(cusparseLtMatDescriptorDestroy(&p->a));
  CSLT_CHECK(cusparseLtMatDescriptorDestroy(&p->b));
  CSLT_CHECK(cusparseLtMatDescriptorDestroy(&p->d));
  return {alg, split_k, split_k_mode, split_k_buffers, max_alg};
}

// Highest algorithm config id for this problem (no plan, no search): Python times each id itself.
int64_t cslt_max_alg_id(const at::Tensor& x, const at::Tensor& compressed, int64_t out, int64_t layout) {
  check_inputs(x, compressed, out);
  check_layout(layout);
  c10::cuda::CUDAGuard guard(x.device());
  int64_t m_pad = (x.size(0) + kRowAlign - 1) / kRowAlign * kRowAlign;
  auto* h = handle_for(x.get_device());
  cudaDataType type = cuda_type(x);
  cusparseLtMatDescriptor_t a, b, d;
  cusparseLtMatmulDescriptor_t matmul;
  cusparseLtMatmulAlgSelection_t alg_sel;
  init_matmul(h, &a, &b, &d, &matmul, type, out, x.size(1), m_pad, layout);
  CSLT_CHECK(cusparseLtMatmulAlgSelectionInit(h, &alg_sel, &matmul, CUSPARSELT_MATMUL_ALG_DEFAULT));
  int max_alg = 0;
  CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(h, &alg_sel, CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID, &max_alg, sizeof(max_alg)));
  CSLT_CHECK(cusparseLtMatmulAlgSelectionDestroy(&alg_sel));
  CSLT_CHECK(cusparseLtMatDescriptorDestroy(&a));
  CSLT_CHECK(cusparseLtMatDescriptorDestroy(&b));
  CSLT_CHECK(cusparseLtMatDescriptorDestroy(&d));
  return max_alg;
}

int64_t cslt_plan_count() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return static_cast<int64_t>(g_plans.size());
}

}  // namespace

// Schemas: llmprune_kernels/library.py. The plan count takes no tensor: one kernel for every key.
TORCH_LIBRARY_IMPL(llmprune_kernels, CompositeImplicitAutograd, m) {
  m.impl("sparse24_cslt_plan_count", &cslt_plan_count);
}

TORCH_LIBRARY_IMPL(llmprune_kernels, CUDA, m) {
  m.impl("sparse24_cslt_compress", &cslt_compress);
  m.impl("sparse24_cslt_linear", &cslt_linear);
  m.impl("sparse24_cslt_search", &cslt_search);
  m.impl("sparse24_cslt_max_alg_id", &cslt_max_alg_id);
}
