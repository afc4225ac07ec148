// Philox uniforms per request: the random numbers of the speculative step outside tree_accept (sampled
// drafting, the q-aware acceptance rule, benchmark drafters), from the same counter-based generator.
//
// Shapes (legend): bs requests, n numbers per request.
//
//   seed    [bs]     int64    Philox key of request b (the same key tree_accept uses)
//   offset  [bs]     int64    Philox counter of request b (the step's; not advanced here)
//   out     [bs, n]  float32  out[b, i] = uniform24(philox4x32_10(counter = (offset_b low, offset_b high,
//                             i, stream), key = seed_b) word 0 >> 8), i.e. a multiple of 2^-24 in [0, 1)
//
// `stream` (>= 1) names the purpose of the numbers, so that the purposes never share a counter: stream 0
// is tree_accept's node draws (counter (offset, node, 0)). Identical on CPU and CUDA, bit for bit (the
// same header-only Philox, philox.h). CUDA: one thread per number; no host synchronization.
#pragma once

#include <cstdint>

namespace specmoe {
namespace philox {

struct UniformParams {
  const int64_t* seed = nullptr;
  const int64_t* offset = nullptr;
  float* out = nullptr;
  int64_t bs = 0, n = 0;
  uint32_t stream = 1;
};

}  // namespace philox
}  // namespace specmoe

#if defined(__CUDACC__) || defined(SPECMOE_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace specmoe {
namespace philox {

cudaError_t launch_uniform(const UniformParams& p, cudaStream_t stream);

}  // namespace philox
}  // namespace specmoe
#endif
