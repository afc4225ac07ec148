// CUDA adapter of specmoe::route_topk / route_budget: checks, outputs, workspace, stream, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "check.h"
#include "routing_common.h"

namespace specmoe {
namespace {

RouteOutputs route_cuda(const at::Tensor& logits, const RouteArgs& a, const std::optional<at::Tensor>& bias,
                        bool renormalize, const std::optional<at::Tensor>& token_weights,
                        const std::optional<at::Tensor>& protect, bool group) {
  const c10::cuda::CUDAGuard guard(logits.device());
  RouteOutputs o = alloc_route_outputs(logits, a, group);
  const size_t ws_bytes = routing::route_workspace_bytes(int(a.T), int(a.E), int(a.K));
  at::Tensor ws;
  if (ws_bytes) ws = at::empty({int64_t(ws_bytes)}, logits.options().dtype(at::kByte));

  routing::RouteParams p;
  p.logits = logits.data_ptr();
  p.logits_stride = logits.stride(0);
  p.logits_dtype = a.dtype;
  p.bias = bias ? bias->data_ptr<float>() : nullptr;
  p.token_weights = token_weights ? token_weights->data_ptr<float>() : nullptr;
  p.protect = protect ? protect->data_ptr<bool>() : nullptr;
  p.T = int(a.T);
  p.E = int(a.E);
  p.K = int(a.K);
  p.num_kept = int(a.num_kept);
  p.scoring = a.scoring;
  p.policy = a.policy;
  p.renormalize = renormalize;
  p.group = group;
  p.n_group = int(a.n_group);
  p.topk_group = int(a.topk_group);
  p.group_scoring = a.group_scoring;
  p.scale = a.scale;
  p.weights = o.weights.data_ptr<float>();
  p.ids = o.ids.data_ptr<int32_t>();
  if (group) {
    p.kept_experts = o.kept_experts.data_ptr<int32_t>();
    p.expert_counts = o.expert_counts.data_ptr<int32_t>();
    p.expert_offsets = o.expert_offsets.data_ptr<int32_t>();
    p.sorted_pairs = o.sorted_pairs.data_ptr<int32_t>();
  }
  p.workspace = ws_bytes ? ws.data_ptr() : nullptr;
  const cudaError_t err = routing::launch_route(p, c10::cuda::getCurrentCUDAStream());
  SPECMOE_CHECK(err == cudaSuccess, "specmoe routing kernel launch failed: ", cudaGetErrorString(err));
  return o;
}

RouteTopkResult route_topk_cuda(const at::Tensor& logits, int64_t top_k, c10::string_view scoring,
                                const std::optional<at::Tensor>& bias, bool renormalize, int64_t n_group,
                                int64_t topk_group, c10::string_view group_scoring, double scale) {
  RouteArgs a = check_route_args("route_topk", logits, top_k, top_k, scoring, bias, std::nullopt,
                                 std::nullopt, "substitute", n_group, topk_group, group_scoring, scale);
  a.num_kept = a.E;
  RouteOutputs o = route_cuda(logits, a, bias, renormalize, std::nullopt, std::nullopt, false);
  return {o.weights, o.ids};
}

RouteBudgetResult route_budget_cuda(const at::Tensor& logits, int64_t top_k, int64_t budget,
                                    c10::string_view scoring, const std::optional<at::Tensor>& bias,
                                    bool renormalize, const std::optional<at::Tensor>& token_weights,
                                    const std::optional<at::Tensor>& protect, c10::string_view policy,
                                    int64_t n_group, int64_t topk_group, c10::string_view group_scoring,
                                    double scale) {
  const RouteArgs a = check_route_args("route_budget", logits, top_k, budget, scoring, bias,
                                       token_weights, protect, policy, n_group, topk_group, group_scoring,
                                       scale);
  return as_budget_result(route_cuda(logits, a, bias, renormalize, token_weights, protect, true));
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, CUDA, m) {
  m.impl("route_topk", &route_topk_cuda);
  m.impl("route_budget", &route_budget_cuda);
}

}  // namespace specmoe
