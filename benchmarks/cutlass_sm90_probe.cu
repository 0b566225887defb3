// Standalone probe of the CUTLASS sm90 2:4 GEMM (csrc/sparse24/cutlass_sm90): checks every
// tile config against a plain fp32 reference on sampled outputs and times it at LLaMA-7B shapes, so the
// kernel can be compiled here (nvcc, no CUDA torch) and judged on the GPU in one short call. The product
// numbers come from benchmarks/bench_sparse24.py (ratios against F.linear in the same run); this only
// decides whether the path is worth wiring in.
// Build: see benchmarks/build_cutlass_probe.sh
#include "sparse24/cutlass_sm90/api.h"

#include "cutlass/numeric_types.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

using namespace llmprune::cutlass24;

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { std::printf("FAIL %s: %s (line %d)\n", #x, cudaGetErrorString(e_), __LINE__); std::exit(1);} } while (0)

template <class T>
__global__ void fill_24(T* w, int out, int in, uint32_t seed) {
  int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;  // one group of 4
  if (g >= int64_t(out) * in / 4) return;
  uint32_t h = uint32_t(g) * 2654435761u ^ seed;
  h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
  int a = h % 4, b = (a + 1 + (h >> 8) % 3) % 4;  // two distinct kept slots
  for (int j = 0; j < 4; ++j) {
    uint32_t v = (h >> (j * 7)) * 2246822519u + j * 374761393u;
    float f = ((v >> 9) % 2001) / 1000.0f - 1.0f;
    w[g * 4 + j] = (j == a || j == b) ? T(f == 0.f ? 0.5f : f) : T(0.f);
  }
}

template <class T>
__global__ void fill_x(T* x, int64_t n, uint32_t seed) {
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  uint32_t v = uint32_t(i) * 2654435761u ^ seed; v ^= v >> 16; v *= 0x7feb352du; v ^= v >> 15;
  x[i] = T(((v >> 9) % 2001) / 1000.0f - 1.0f);
}

// err[s] = |y - ref| / (|ref|_1 row-scale) for sampled (token, out) pairs
template <class T>
__global__ void check(const T* w, const T* x, const T* y, int out, int tokens, int in, float* err, int samples) {
  int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= samples) return;
  uint32_t h = uint32_t(s) * 2654435761u + 12345u; h ^= h >> 15;
  int t = h % tokens, o = (h / tokens) % out;
  if (s == 0) { t = 0; o = 0; }
  if (s == 1) { t = tokens - 1; o = out - 1; }
  float acc = 0.f, scale = 0.f;
  for (int k = 0; k < in; ++k) {
    float p = float(w[int64_t(o) * in + k]) * float(x[int64_t(t) * in + k]);
    acc += p; scale += fabsf(p);
  }
  err[s] = fabsf(float(y[int64_t(t) * out + o]) - acc) / (scale + 1e-6f);
}

template <class T>
void run(bool dt, const char* name, int out, int in, int tokens, int device, int sms, bool time_it) {
  T *w, *x, *y, *vals[kFormats]; uint8_t* meta[kFormats]; float* err;
  CK(cudaMalloc(&w, sizeof(T) * int64_t(out) * in));
  CK(cudaMalloc(&x, sizeof(T) * int64_t(tokens) * in));
  CK(cudaMalloc(&y, sizeof(T) * int64_t(tokens) * out));
  const int samples = 4096;
  CK(cudaMalloc(&err, sizeof(float) * samples));
  fill_24<<<(int64_t(out) * in / 4 + 255) / 256, 256>>>(w, out, in, 7u);
  fill_x<<<(int64_t(tokens) * in + 255) / 256, 256>>>(x, int64_t(tokens) * in, 9u);
  for (int f = 0; f < kFormats; ++f) {  // the weight in each metadata format
    PackedSizes ps = packed_sizes(dt, f, out, in);
    CK(cudaMalloc(&vals[f], sizeof(T) * ps.values));
    CK(cudaMalloc(&meta[f], ps.meta_bytes));
    size_t cws = compress_workspace(dt, f, out, in, device, sms);
    void* cw = nullptr; if (cws) CK(cudaMalloc(&cw, cws));
    CK(compress(dt, f, w, vals[f], meta[f], out, in, device, sms, cw, 0));
    CK(cudaDeviceSynchronize());
    if (cw) cudaFree(cw);
  }
  const int n_cfg = std::getenv("PROBE_ALL") ? kConfigs : kTiles;  // PROBE_ALL: every schedule too
  for (int cfg = 0; cfg < n_cfg; ++cfg) {
    size_t ws = gemm_workspace(dt, cfg, out, tokens, in, device, sms);
    void* wsp = nullptr; if (ws) CK(cudaMalloc(&wsp, ws));
    CK(cudaMemset(y, 0, sizeof(T) * int64_t(tokens) * out));
    const int f = format_of_tile(tile_of(cfg));
    cudaError_t e = gemm(dt, cfg, vals[f], meta[f], x, y, out, tokens, in, device, sms, wsp, 0);
    if (e != cudaSuccess) { std::printf("%s %dx%d M=%d cfg=%d: gemm refused (%s)\n", name, out, in, tokens, cfg, cudaGetErrorString(e)); continue; }
    CK(cudaDeviceSynchronize());
    check<<<(samples + 127) / 128, 128>>>(w, x, y, out, tokens, in, err, samples);
    std::vector<float> h(samples);
    CK(cudaMemcpy(h.data(), err, sizeof(float) * samples, cudaMemcpyDeviceToHost));
    float mx = 0; for (float v : h) mx = v > mx ? v : mx;
    float ms = -1;
    if (time_it) {
      cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
      for (int i = 0; i < 5; ++i) gemm(dt, cfg, vals[f], meta[f], x, y, out, tokens, in, device, sms, wsp, 0);
      const int iters = 30;
      cudaEventRecord(a);
      for (int i = 0; i < iters; ++i) gemm(dt, cfg, vals[f], meta[f], x, y, out, tokens, in, device, sms, wsp, 0);
      cudaEventRecord(b); CK(cudaEventSynchronize(b));
      cudaEventElapsedTime(&ms, a, b); ms /= iters;
    }
    std::printf("{\"dtype\": \"%s\", \"out\": %d, \"in\": %d, \"m\": %d, \"config\": %d, \"max_rel_err\": %.3g, \"ms\": %.4f}\n",
                name, out, in, tokens, cfg, mx, ms);
    if (wsp) cudaFree(wsp);
  }
  for (int f = 0; f < kFormats; ++f) { cudaFree(vals[f]); cudaFree(meta[f]); }
  cudaFree(w); cudaFree(x); cudaFree(y); cudaFree(err);
}

int main() {
  int device = 0, sms = 0;
  CK(cudaGetDevice(&device));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, device));
  std::printf("# %s, %d SMs\n", prop.name, sms);
  // odd sizes: tokens not a multiple of any tile
  run<cutlass::half_t>(false, "float16", 256, 512, 40, device, sms, false);
  run<cutlass::bfloat16_t>(true, "bfloat16", 384, 1024, 77, device, sms, false);
  const int shapes[3][2] = {{4096, 4096}, {11008, 4096}, {4096, 11008}};
  for (int m : {2048, 8192})
    for (auto& s : shapes) {
      run<cutlass::bfloat16_t>(true, "bfloat16", s[0], s[1], m, device, sms, true);
      run<cutlass::half_t>(false, "float16", s[0], s[1], m, device, sms, true);
    }
  return 0;
}
