// Torch-free latency probe of the fused routing kernel: per-call time in a CUDA graph, an empty
// kernel's time in the same kind of graph (the launch floor), and clock64() per phase.
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -DSPECMOE_ROUTE_PHASES \
//        -Icsrc/kernels bench/routing_phases.cu -o /tmp/routing_phases
#include <cuda_bf16.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "routing.cu"  // one translation unit: the phase clocks must be the kernel's own

#define CHECK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
  std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); std::exit(1); } } while (0)

__global__ void empty_kernel(int* p) { if (p && threadIdx.x == 1024) *p = 0; }

template <typename F>
static float graph_us(cudaStream_t s, F&& launch, int calls = 100, int reps = 20) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < calls; ++i) launch();
  CHECK(cudaStreamEndCapture(s, &g));
  CHECK(cudaGraphInstantiate(&ge, g, 0));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  CHECK(cudaGraphLaunch(ge, s));
  std::vector<float> t;
  for (int r = 0; r < reps; ++r) {
    CHECK(cudaEventRecord(a, s));
    CHECK(cudaGraphLaunch(ge, s));
    CHECK(cudaEventRecord(b, s));
    CHECK(cudaEventSynchronize(b));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms * 1000.f / calls);
  }
  std::sort(t.begin(), t.end());
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  return t[t.size() / 2];
}

int main() {
  using namespace specmoe::routing;
  cudaStream_t s;
  CHECK(cudaStreamCreate(&s));
  std::printf("empty kernel in a graph: %.2f us/call\n",
              graph_us(s, [&] { empty_kernel<<<1, 1024, 0, s>>>(nullptr); }));
  const int cases[][4] = {{1, 128, 8, 32}, {8, 128, 8, 32}, {64, 128, 8, 32}, {128, 128, 8, 32},
                          {1, 64, 8, 32}, {64, 256, 8, 32}, {64, 128, 8, 128}};
  std::printf("%5s %4s %3s %4s %6s %8s | cycles per phase: tok1 budget-prep select finalize group-prep group\n",
              "T", "E", "K", "B", "prot", "us");
  for (auto& c : cases)
    for (int prot = 0; prot < 2; ++prot) {
      const int T = c[0], E = c[1], K = c[2], B = c[3];
      std::vector<__nv_bfloat16> h(T * E);
      srand(T * 7 + E);
      for (auto& v : h) v = __float2bfloat16((rand() % 2001 - 1000) / 300.f);
      void *logits, *out;
      CHECK(cudaMalloc(&logits, h.size() * 2));
      CHECK(cudaMemcpy(logits, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
      CHECK(cudaMalloc(&out, (size_t(T) * K * 12 + 3 * E + 8 + T) * 4));
      RouteParams p;
      p.logits = logits;
      p.logits_stride = E;
      p.logits_dtype = DType::kBFloat16;
      p.T = T; p.E = E; p.K = K; p.num_kept = B < E ? B : E;
      p.weights = static_cast<float*>(out);
      p.ids = reinterpret_cast<int32_t*>(p.weights + T * K);
      p.sorted_pairs = p.ids + T * K;
      p.kept_experts = p.sorted_pairs + T * K;
      p.expert_counts = p.kept_experts + E;
      p.expert_offsets = p.expert_counts + E;
      bool* protect = reinterpret_cast<bool*>(p.expert_offsets + E + 2);
      CHECK(cudaMemset(protect, 0, T));
      CHECK(cudaMemset(protect, 1, 1));
      p.protect = prot ? protect : nullptr;
      CHECK(launch_route(p, s));
      CHECK(cudaStreamSynchronize(s));
      const float us = graph_us(s, [&] { CHECK(launch_route(p, s)); });
      long long clk[16];
      CHECK(launch_route(p, s));
      CHECK(cudaStreamSynchronize(s));
      CHECK(cudaMemcpyFromSymbol(clk, g_route_phase_clock, sizeof(clk)));
      std::printf("%5d %4d %3d %4d %6d %8.2f |", T, E, K, B, prot, us);
      for (int i = 1; i <= 6; ++i) std::printf(" %6lld", clk[i] - clk[i - 1]);
      std::printf("  total %lld\n", clk[6] - clk[0]);
      cudaFree(logits);
      cudaFree(out);
    }
  return 0;
}
