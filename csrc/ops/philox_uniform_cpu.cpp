// CPU implementation of specmoe::philox_uniform (the same header-only Philox as the CUDA kernel).
#include <torch/library.h>

#include "../kernels/philox.h"
#include "philox_uniform_common.h"

namespace specmoe {
namespace {

at::Tensor philox_uniform_cpu(const at::Tensor& seed, const at::Tensor& offset, int64_t n, int64_t stream) {
  check_philox_uniform_args(seed, offset, n, stream);
  const int64_t bs = seed.size(0);
  at::Tensor out = at::empty({bs, n}, seed.options().dtype(at::kFloat));
  const int64_t* sd = seed.data_ptr<int64_t>();
  const int64_t* off = offset.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  for (int64_t b = 0; b < bs; ++b) {
    const uint64_t s = uint64_t(sd[b]), f = uint64_t(off[b]);
    for (int64_t i = 0; i < n; ++i) {
      const philox::Words w = philox::philox4x32_10(uint32_t(f), uint32_t(f >> 32), uint32_t(i), uint32_t(stream),
                                                    uint32_t(s), uint32_t(s >> 32));
      o[b * n + i] = philox::uniform24(w.x[0] >> 8);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, CPU, m) { m.impl("philox_uniform", &philox_uniform_cpu); }

}  // namespace specmoe
