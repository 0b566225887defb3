// Experiment: do 2:4 tiles with a 128-deep K step beat the shipped 64-deep ones on the H100?
// CUTLASS's generator halves the sparse K tile to 64 to afford more pipeline stages; cuSPARSELt's fp16
// kernels, 8-20% faster than our CUTLASS ones at M >= 2048, may not. A K = 128 tile reads another
// metadata layout (CUTLASS's TensorEAtomK = min(TK, 128)), so each tile here compresses the weight in its
// own format. Times every tile on the same bf16 weights (several copies, > 2x L2, used in turn), in
// alternating bursts against the shipped best tiles (ratios of medians over 15 trials); checks sampled
// outputs against an fp32 reference. Torch-free: built here with nvcc, run on the GPU machine.
// Build: nvcc -O3 -DNDEBUG -std=c++17 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a \
//          -I$CUTLASS_INC -I$CUTLASS_INC/../tools/util/include -Icsrc benchmarks/cutlass_sm90_k128_probe.cu
#include "sparse24/cutlass_sm90/kernels.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

using namespace llmprune::cutlass24;
using BF = cutlass::bfloat16_t;

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { std::printf("FAIL %s: %s (line %d)\n", #x, cudaGetErrorString(e_), __LINE__); std::exit(1);} } while (0)

__global__ void fill_24(BF* w, int64_t groups, uint32_t seed) {
  int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g >= groups) return;
  uint32_t h = uint32_t(g) * 2654435761u ^ seed;
  h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
  int a = h % 4, b = (a + 1 + (h >> 8) % 3) % 4;
  for (int j = 0; j < 4; ++j) {
    uint32_t v = (h >> (j * 7)) * 2246822519u + j * 374761393u;
    float f = ((v >> 9) % 2001) / 1000.0f - 1.0f;
    w[g * 4 + j] = (j == a || j == b) ? BF(f == 0.f ? 0.5f : f) : BF(0.f);
  }
}

__global__ void fill_x(BF* x, int64_t n, uint32_t seed) {
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  uint32_t v = uint32_t(i) * 2654435761u ^ seed; v ^= v >> 16; v *= 0x7feb352du; v ^= v >> 15;
  x[i] = BF(((v >> 9) % 2001) / 1000.0f - 1.0f);
}

__global__ void check(const BF* w, const BF* x, const BF* y, int out, int tokens, int in, float* err, int samples) {
  int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= samples) return;
  uint32_t h = uint32_t(s) * 2654435761u + 12345u; h ^= h >> 15;
  int t = h % tokens, o = (h / tokens) % out;
  float acc = 0.f, scale = 0.f;
  for (int k = 0; k < in; ++k) {
    float p = float(w[int64_t(o) * in + k]) * float(x[int64_t(t) * in + k]);
    acc += p; scale += fabsf(p);
  }
  err[s] = fabsf(float(y[int64_t(t) * out + o]) - acc) / (scale + 1e-6f);
}

struct Problem { int out, in, tokens, device, sms, copies; std::vector<BF*> w; BF *x, *y; };

// One tile: the weight copies compressed in its format, a launcher, and its label.
struct Tile {
  const char* name;
  std::vector<void*> vals, meta;
  void* ws = nullptr;
  cudaError_t (*run)(Tile&, Problem&, int copy);
};

template <class G>
cudaError_t run_g(Tile& t, Problem& p, int c) {
  return launch<typename G::Gemm>(gemm_args<G>(t.vals[c], t.meta[c], p.x, p.y, p.out, p.tokens, p.in, p.device, p.sms,
                                               Schedule{1, 0}), t.ws, 0);
}

template <class G>
Tile make_tile(const char* name, Problem& p) {
  Tile t; t.name = name; t.run = run_g<G>;
  typename G::ProblemShape shape{p.out, 8, p.in, 1};
  auto stride_a = cutlass::make_cute_packed_stride(typename G::StrideA{}, cute::make_shape(p.out, p.in, 1));
  typename G::CompressorUtility util(shape, stride_a);
  size_t nv = size_t(p.out) * util.get_tensorA_k_physical() * sizeof(BF);
  size_t nm = size_t(util.get_metadata_m_physical()) * util.get_metadata_k_physical() *
              cutlass::sizeof_bits<typename G::ElementE>::value / 8;
  for (int c = 0; c < p.copies; ++c) {
    void *v, *m; CK(cudaMalloc(&v, nv)); CK(cudaMalloc(&m, nm));
    cutlass::KernelHardwareInfo hw{p.device, p.sms};
    typename G::Compressor::Arguments args{shape, {p.w[c], stride_a, static_cast<BF*>(v),
                                                   static_cast<typename G::ElementE*>(m)}, {hw}};
    void* cws = nullptr; size_t n = G::Compressor::get_workspace_size(args); if (n) CK(cudaMalloc(&cws, n));
    CK(launch<typename G::Compressor>(args, cws, 0)); CK(cudaDeviceSynchronize()); if (cws) cudaFree(cws);
    t.vals.push_back(v); t.meta.push_back(m);
  }
  size_t ws = gemm_workspace_g<G>(p.out, p.tokens, p.in, p.device, p.sms, Schedule{1, 0});
  if (ws) CK(cudaMalloc(&t.ws, ws));
  return t;
}

template <int TM, int TN, int TK, int CM, int CN, class S = void>
using G = SparseGemm<BF, TM, TN, TK, CM, CN, S>;
using SK = cutlass::gemm::StreamKScheduler;

float burst(Tile& t, Problem& p, int reps) {
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  cudaEventRecord(a);
  for (int i = 0; i < reps; ++i) t.run(t, p, i % p.copies);
  cudaEventRecord(b); CK(cudaEventSynchronize(b));
  float ms; cudaEventElapsedTime(&ms, a, b);
  cudaEventDestroy(a); cudaEventDestroy(b);
  return ms / reps;
}

int main() {
  Problem p{};
  CK(cudaGetDevice(&p.device));
  CK(cudaDeviceGetAttribute(&p.sms, cudaDevAttrMultiProcessorCount, p.device));
  cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, p.device));
  std::printf("# %s, %d SMs\n", prop.name, p.sms);
  const int shapes[3][2] = {{4096, 4096}, {11008, 4096}, {4096, 11008}};
  float* err; const int samples = 2048; CK(cudaMalloc(&err, sizeof(float) * samples));
  for (int m : {2048, 8192})
    for (auto& s : shapes) {
      p.out = s[0]; p.in = s[1]; p.tokens = m;
      int64_t sparse_bytes = int64_t(p.out) * p.in * 9 / 8;
      p.copies = int(std::min<int64_t>(8, std::max<int64_t>(2, (2 * prop.l2CacheSize + sparse_bytes - 1) / sparse_bytes)));
      p.w.clear();
      for (int c = 0; c < p.copies; ++c) {
        BF* w; CK(cudaMalloc(&w, sizeof(BF) * int64_t(p.out) * p.in));
        fill_24<<<(int64_t(p.out) * p.in / 4 + 255) / 256, 256>>>(w, int64_t(p.out) * p.in / 4, 7u + c);
        p.w.push_back(w);
      }
      CK(cudaMalloc(&p.x, sizeof(BF) * int64_t(m) * p.in));
      CK(cudaMalloc(&p.y, sizeof(BF) * int64_t(m) * p.out));
      fill_x<<<(int64_t(m) * p.in + 255) / 256, 256>>>(p.x, int64_t(m) * p.in, 9u);
      std::vector<Tile> tiles;
      tiles.push_back(make_tile<G<256, 128, 64, 1, 2>>("256x128x64 c1x2 (shipped 4)", p));
      tiles.push_back(make_tile<G<256, 128, 64, 1, 2, SK>>("256x128x64 c1x2 stream-K (shipped 7)", p));
      tiles.push_back(make_tile<G<256, 128, 128, 1, 2>>("256x128x128 c1x2", p));
      tiles.push_back(make_tile<G<256, 128, 128, 1, 2, SK>>("256x128x128 c1x2 stream-K", p));
      tiles.push_back(make_tile<G<256, 128, 128, 2, 1>>("256x128x128 c2x1", p));
      tiles.push_back(make_tile<G<128, 256, 128, 1, 2>>("128x256x128 c1x2", p));
      tiles.push_back(make_tile<G<128, 128, 128, 2, 1>>("128x128x128 c2x1", p));
      const int reps = 20, trials = 15;
      std::vector<std::vector<float>> t(tiles.size());
      for (auto& tl : tiles) for (int i = 0; i < 3; ++i) tl.run(tl, p, i % p.copies);  // warm-up
      CK(cudaDeviceSynchronize());
      for (int tr = 0; tr < trials; ++tr)
        for (size_t i = 0; i < tiles.size(); ++i) t[i].push_back(burst(tiles[i], p, reps));
      std::vector<float> med;
      for (auto& v : t) { std::sort(v.begin(), v.end()); med.push_back(v[v.size() / 2]); }
      float base = std::min(med[0], med[1]);
      for (size_t i = 0; i < tiles.size(); ++i) {
        CK(tiles[i].run(tiles[i], p, 0)); CK(cudaDeviceSynchronize());
        check<<<(samples + 127) / 128, 128>>>(p.w[0], p.x, p.y, p.out, p.tokens, p.in, err, samples);
        std::vector<float> h(samples);
        CK(cudaMemcpy(h.data(), err, sizeof(float) * samples, cudaMemcpyDeviceToHost));
        float mx = *std::max_element(h.begin(), h.end());
        std::printf("{\"out\": %d, \"in\": %d, \"m\": %d, \"tile\": \"%s\", \"ms\": %.4f, \"best_shipped_over_this\": %.3f, "
                    "\"max_rel_err\": %.3g}\n", p.out, p.in, m, tiles[i].name, med[i], base / med[i], mx);
      }
      for (auto& tl : tiles) { for (auto v : tl.vals) cudaFree(v); for (auto v : tl.meta) cudaFree(v); if (tl.ws) cudaFree(tl.ws); }
      for (auto w : p.w) cudaFree(w);
      cudaFree(p.x); cudaFree(p.y);
    }
  return 0;
}
