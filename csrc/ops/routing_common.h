// Shared by the CPU, CUDA and Meta implementations of the routing ops: argument validation (every check
// runs before any allocation or kernel, and names the argument, the expectation and the value) and the
// output allocation. Templates on the size type I (int64_t; c10::SymInt in the Meta kernels: check.h).
// Shapes: see csrc/kernels/routing.h. Values (NaN / Inf logits, bias, token weights) are not errors
// but follow the rules of routing.h, the same on every backend.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string_view>

#include "../kernels/routing.h"
#include "check.h"

namespace specmoe {

template <typename I>
struct RouteArgsT {
  I T, E;
  int64_t K;
  I num_kept;
  routing::Scoring scoring;
  routing::Policy policy;
  routing::DType dtype;
  int64_t n_group = 1, topk_group = 1;
  routing::GroupScoring group_scoring = routing::GroupScoring::kTop2Sum;
  float scale = 1.f;
};

// Grouped top-K and the weight scale (routing.h): G = n_group divides E, G <= kMaxGroups,
// 1 <= topk_group <= G, topk_group * E / G >= top_k, group_scoring 'top2' (groups of >= 2 experts) or
// 'max', scale a finite number > 0.
template <typename I>
void check_route_groups(const char* op, RouteArgsT<I>& a, int64_t n_group, int64_t topk_group,
                        std::string_view group_scoring, double scale) {
  SPECMOE_CHECK(n_group >= 1 && n_group <= routing::kMaxGroups, op, ": n_group must be in [1, ",
                int(routing::kMaxGroups), "], got ", n_group);
  SPECMOE_CHECK(a.E % n_group == 0, op, ": n_group (", n_group, ") must divide the number of experts E = ", a.E);
  SPECMOE_CHECK(topk_group >= 1 && topk_group <= n_group, op, ": topk_group must be in [1, n_group = ", n_group,
                "], got ", topk_group);
  SPECMOE_CHECK(topk_group * (a.E / n_group) >= a.K, op, ": topk_group (", topk_group, ") groups of E / n_group = ",
                a.E / n_group, " experts hold fewer than top_k = ", a.K, " experts");
  if (group_scoring == "top2") a.group_scoring = routing::GroupScoring::kTop2Sum;
  else if (group_scoring == "max") a.group_scoring = routing::GroupScoring::kMax;
  else SPECMOE_CHECK(false, op, ": group_scoring must be 'top2' or 'max', got '", group_scoring, "'");
  SPECMOE_CHECK(n_group == 1 || a.group_scoring != routing::GroupScoring::kTop2Sum || a.E / n_group >= 2, op,
                ": group_scoring 'top2' needs groups of >= 2 experts, got E / n_group = ", a.E / n_group);
  SPECMOE_CHECK(std::isfinite(scale) && scale > 0.0 && scale <= 3.0e38, op,
                ": scale must be a finite number > 0, got ", scale);
  a.n_group = n_group;
  a.topk_group = topk_group;
  a.scale = static_cast<float>(scale);
}
using RouteArgs = RouteArgsT<int64_t>;

template <typename I>
void check_optional_vector(const char* op, const char* name, const std::optional<at::Tensor>& t, const I& len,
                           at::ScalarType dtype, const at::Tensor& logits) {
  if (!t.has_value()) return;
  SPECMOE_CHECK(t->dim() == 1 && size_of<I>(*t, 0) == len, op, ": ", name, " must have shape [", len,
                "], got ", sizes_of<I>(*t));
  SPECMOE_CHECK(t->scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t->scalar_type());
  check_same_device(op, name, *t, logits, "logits");
  SPECMOE_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
}

template <typename I = int64_t>
RouteArgsT<I> check_route_args(const char* op, const at::Tensor& logits, int64_t top_k, int64_t budget,
                               std::string_view scoring, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& token_weights,
                               const std::optional<at::Tensor>& protect, std::string_view policy,
                               int64_t n_group = 1, int64_t topk_group = 1,
                               std::string_view group_scoring = "top2", double scale = 1.0) {
  SPECMOE_CHECK(logits.dim() == 2, op, ": logits must be 2-D [T, E], got shape ", sizes_of<I>(logits));
  const auto st = logits.scalar_type();
  SPECMOE_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op,
                ": logits must be float32, bfloat16 or float16, got ", st);
  SPECMOE_CHECK(logits.is_contiguous(), op, ": logits must be contiguous, got strides ", strides_of<I>(logits),
                " (call .contiguous())");
  RouteArgsT<I> a{size_of<I>(logits, 0), size_of<I>(logits, 1), top_k, I(0), {}, {}, {}};
  SPECMOE_CHECK(a.E >= 1 && a.E <= routing::kMaxExperts, op, ": number of experts E = logits.size(1) must be in [1, ",
                int(routing::kMaxExperts), "], got ", a.E);
  SPECMOE_CHECK(top_k >= 1 && top_k <= a.E && top_k <= routing::kMaxTopK, op, ": top_k must be in [1, min(E, ",
                int(routing::kMaxTopK), ")] with E = ", a.E, ", got ", top_k);
  SPECMOE_CHECK(budget >= top_k, op, ": budget must be >= top_k (", top_k, "), got ", budget);
  SPECMOE_CHECK(a.T * a.K <= INT32_MAX, op, ": T * top_k must fit in int32, got T = ", a.T);
  a.num_kept = budget < a.E ? I(budget) : a.E;
  if (scoring == "softmax") a.scoring = routing::Scoring::kSoftmax;
  else if (scoring == "sigmoid") a.scoring = routing::Scoring::kSigmoid;
  else SPECMOE_CHECK(false, op, ": scoring must be 'softmax' or 'sigmoid', got '", scoring, "'");
  if (policy == "substitute") a.policy = routing::Policy::kSubstitute;
  else if (policy == "truncate") a.policy = routing::Policy::kTruncate;
  else SPECMOE_CHECK(false, op, ": policy must be 'substitute' or 'truncate', got '", policy, "'");
  a.dtype = st == at::kFloat ? routing::DType::kFloat32
          : st == at::kBFloat16 ? routing::DType::kBFloat16 : routing::DType::kFloat16;
  check_optional_vector<I>(op, "bias", bias, a.E, at::kFloat, logits);
  check_optional_vector<I>(op, "token_weights", token_weights, a.T, at::kFloat, logits);
  check_optional_vector<I>(op, "protect", protect, a.T, at::kBool, logits);
  check_route_groups<I>(op, a, n_group, topk_group, group_scoring, scale);
  return a;
}

struct RouteOutputs {
  at::Tensor weights, ids, kept_experts, expert_counts, expert_offsets, sorted_pairs;
};

// weights / ids [T, K]; with `group` also kept_experts / expert_counts [Bk], expert_offsets [Bk + 1],
// sorted_pairs [T * K]. On logits' device.
template <typename I>
RouteOutputs alloc_route_outputs(const at::Tensor& logits, const RouteArgsT<I>& a, bool group) {
  const auto i32 = logits.options().dtype(at::kInt);
  RouteOutputs o;
  o.weights = empty_sized<I>({a.T, I(a.K)}, logits.options().dtype(at::kFloat));
  o.ids = empty_sized<I>({a.T, I(a.K)}, i32);
  if (group) {
    o.kept_experts = empty_sized<I>({a.num_kept}, i32);
    o.expert_counts = empty_sized<I>({a.num_kept}, i32);
    o.expert_offsets = empty_sized<I>({a.num_kept + 1}, i32);
    o.sorted_pairs = empty_sized<I>({a.T * a.K}, i32);
  }
  return o;
}

using RouteTopkResult = std::tuple<at::Tensor, at::Tensor>;
using RouteBudgetResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline RouteBudgetResult as_budget_result(RouteOutputs o) {
  return {o.weights, o.ids, o.kept_experts, o.expert_counts, o.expert_offsets, o.sorted_pairs};
}

}  // namespace specmoe
