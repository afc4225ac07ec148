// Meta (fake) kernel of specmoe::philox_uniform: the CPU/CUDA argument checks (philox_uniform_common.h,
// with symbolic sizes) and an empty float32 [bs, n].
#include <torch/library.h>

#include "philox_uniform_common.h"

namespace specmoe {
namespace {

at::Tensor philox_uniform_meta(const at::Tensor& seed, const at::Tensor& offset, int64_t n, int64_t stream) {
  check_philox_uniform_args<c10::SymInt>(seed, offset, n, stream);
  return empty_sized<c10::SymInt>({size_of<c10::SymInt>(seed, 0), c10::SymInt(n)},
                                  seed.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, Meta, m) { m.impl("philox_uniform", &philox_uniform_meta); }

}  // namespace specmoe
