// Meta (fake) kernels of specmoe::route_topk / route_budget: the CPU/CUDA argument checks
// (routing_common.h, with symbolic sizes) and empty outputs of the real shapes and dtypes. They serve
// meta tensors, torch.compile / FakeTensor / opcheck, and calls mixing meta with other devices (the
// dispatcher sends those here; the device checks then raise).
#include <torch/library.h>

#include "routing_common.h"

namespace specmoe {
namespace {

RouteTopkResult route_topk_meta(const at::Tensor& logits, int64_t top_k, c10::string_view scoring,
                                const std::optional<at::Tensor>& bias, bool /*renormalize*/, int64_t n_group,
                                int64_t topk_group, c10::string_view group_scoring, double scale) {
  auto a = check_route_args<c10::SymInt>("route_topk", logits, top_k, top_k, scoring, bias, std::nullopt,
                                         std::nullopt, "substitute", n_group, topk_group, group_scoring, scale);
  a.num_kept = a.E;
  RouteOutputs o = alloc_route_outputs(logits, a, false);
  return {o.weights, o.ids};
}

RouteBudgetResult route_budget_meta(const at::Tensor& logits, int64_t top_k, int64_t budget,
                                    c10::string_view scoring, const std::optional<at::Tensor>& bias,
                                    bool /*renormalize*/, const std::optional<at::Tensor>& token_weights,
                                    const std::optional<at::Tensor>& protect, c10::string_view policy,
                                    int64_t n_group, int64_t topk_group, c10::string_view group_scoring,
                                    double scale) {
  const auto a = check_route_args<c10::SymInt>("route_budget", logits, top_k, budget, scoring, bias,
                                               token_weights, protect, policy, n_group, topk_group,
                                               group_scoring, scale);
  return as_budget_result(alloc_route_outputs(logits, a, true));
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, Meta, m) {
  m.impl("route_topk", &route_topk_meta);
  m.impl("route_budget", &route_budget_meta);
}

}  // namespace specmoe
