// Meta (fake) kernel of specmoe::fused_moe: the CPU/CUDA argument checks (fused_moe_common.h, with
// symbolic sizes; the CUDA rules when the fake tensors stand for CUDA ones) and an empty y of x's shape.
// The grouping's values are data, which a meta tensor has none of (CPU: always checked; CUDA: on request).
#include <torch/library.h>

#include "fused_moe_common.h"

namespace specmoe {
namespace {

at::Tensor fused_moe_meta(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                          const at::Tensor& weights, const at::Tensor& kept, const at::Tensor& counts,
                          const at::Tensor& offsets, const at::Tensor& pairs,
                          const c10::optional<at::Tensor>& shared_w13, const c10::optional<at::Tensor>& shared_w2,
                          const c10::optional<at::Tensor>& shared_weight) {
  const auto a = check_moe_args<c10::SymInt>(x, w13, w2, weights, kept, counts, offsets, pairs,
                                             meta_stands_for_cuda(x));
  check_shared_expert<c10::SymInt>(x, shared_w13, shared_w2, shared_weight);
  return empty_sized<c10::SymInt>({a.T, a.h}, x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, Meta, m) { m.impl("fused_moe", &fused_moe_meta); }

}  // namespace specmoe
