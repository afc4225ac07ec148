// Philox uniforms per request (contract: philox_uniform.h): one thread per number.
#include <cuda_runtime.h>

#include "philox.h"
#include "philox_uniform.h"

namespace specmoe {
namespace philox {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) uniform_kernel(UniformParams p) {
  const int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= p.bs * p.n) return;
  const int64_t b = idx / p.n, i = idx % p.n;
  const uint64_t off = uint64_t(p.offset[b]), seed = uint64_t(p.seed[b]);
  const Words w = philox4x32_10(uint32_t(off), uint32_t(off >> 32), uint32_t(i), p.stream, uint32_t(seed),
                                uint32_t(seed >> 32));
  p.out[idx] = uniform24(w.x[0] >> 8);
}

}  // namespace

cudaError_t launch_uniform(const UniformParams& p, cudaStream_t stream) {
  if (p.bs < 0 || p.n < 0 || p.stream == 0) return cudaErrorInvalidValue;
  const int64_t total = p.bs * p.n;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidValue;
  uniform_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace philox
}  // namespace specmoe
