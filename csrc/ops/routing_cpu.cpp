// CPU implementation of specmoe::route_topk / route_budget: straightforward float32 loops with the
// exact semantics of csrc/kernels/routing.h (same tie rules and the same value rules for NaN / Inf
// logits, bias, token weights and group scores: routing::clean_*, so expert ids match the CUDA kernel).
// Grouped top-K: the group scores are the same float sums (best + second best) as the kernel's.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "routing_common.h"

namespace specmoe {
namespace {

using routing::Policy;
using routing::Scoring;

struct RowProbs {
  std::vector<float> x, P;  // clean logits (routing::clean_logit), probabilities
};

void row_probs(const float* row, int64_t E, Scoring scoring, RowProbs& r) {
  r.x.resize(E);
  r.P.resize(E);
  for (int64_t e = 0; e < E; ++e) r.x[e] = routing::clean_logit(row[e]);
  if (scoring == Scoring::kSigmoid) {
    for (int64_t e = 0; e < E; ++e) r.P[e] = 1.f / (1.f + std::exp(-r.x[e]));
    return;
  }
  float m = -INFINITY;
  for (int64_t e = 0; e < E; ++e) m = std::max(m, r.x[e]);
  if (m == -INFINITY) m = 0.f;
  float s = 0.f;
  for (int64_t e = 0; e < E; ++e) s += (r.P[e] = std::exp(r.x[e] - m));
  const float inv = s > 0.f ? 1.f / s : 0.f;  // one reciprocal per row, as the CUDA kernel does
  for (int64_t e = 0; e < E; ++e) r.P[e] *= inv;
}

// Top-k of `key` among experts with allowed[e] (nullptr: all), best first, ties to the lower id.
// Writes min(k, allowed count) ids and returns that count.
int64_t topk(const std::vector<float>& key, const std::vector<char>* allowed, int64_t k, int32_t* out) {
  std::vector<int32_t> idx;
  for (int32_t e = 0; e < static_cast<int32_t>(key.size()); ++e)
    if (!allowed || (*allowed)[e]) idx.push_back(e);
  k = std::min<int64_t>(k, static_cast<int64_t>(idx.size()));
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
    return key[a] > key[b] || (key[a] == key[b] && a < b);
  });
  std::copy(idx.begin(), idx.begin() + k, out);
  return k;
}

// Grouped top-K (routing.h): in_group[e] = 1 for the experts of the token's topk_group best groups,
// groups scored by the sum of their best two (or their best) values of g = P + bias (bias) or P.
void token_groups(const RowProbs& r, const float* bias, const RouteArgs& a, std::vector<char>& in_group) {
  const int64_t G = a.n_group, gs = a.E / G;
  std::vector<float> score(G);
  for (int64_t g = 0; g < G; ++g) {
    float m1 = -INFINITY, m2 = -INFINITY;
    bool any = false;
    for (int64_t e = g * gs; e < (g + 1) * gs; ++e) {
      const float v = bias ? routing::clean_key(r.P[e] + bias[e]) : r.P[e];
      if (!any || v > m1) {
        if (any) m2 = m1;
        m1 = v;
        any = true;
      } else if (v > m2) {
        m2 = v;
      }
    }
    score[g] = routing::clean_group_score(a.group_scoring == routing::GroupScoring::kTop2Sum ? m1 + m2 : m1);
  }
  std::vector<int64_t> order(G);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return score[x] > score[y]; });
  in_group.assign(a.E, 0);
  for (int64_t j = 0; j < a.topk_group; ++j)
    std::fill(in_group.begin() + order[j] * gs, in_group.begin() + (order[j] + 1) * gs, 1);
}

RouteOutputs route_cpu(const at::Tensor& logits_in, const RouteArgs& a, const std::optional<at::Tensor>& bias,
                       bool renormalize, const std::optional<at::Tensor>& token_weights,
                       const std::optional<at::Tensor>& protect, bool group) {
  RouteOutputs o = alloc_route_outputs(logits_in, a, group);
  const at::Tensor logits = logits_in.to(at::kFloat).contiguous();
  const int64_t T = a.T, E = a.E, K = a.K, Bk = a.num_kept;
  const float* L = logits.data_ptr<float>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  const float* tw = token_weights ? token_weights->data_ptr<float>() : nullptr;
  const bool* prot = protect ? protect->data_ptr<bool>() : nullptr;
  float* W = o.weights.data_ptr<float>();
  int32_t* ids = o.ids.data_ptr<int32_t>();
  const bool budget = Bk < E;

  std::vector<RowProbs> rows(T);
  std::vector<float> key(E);
  std::vector<int32_t> natural(T * K);
  std::vector<float> score(E, 0.f);
  const bool grouped = a.n_group > 1;
  std::vector<std::vector<char>> in_group(grouped ? T : 0);
  auto make_key = [&](const RowProbs& r) {
    for (int64_t e = 0; e < E; ++e) key[e] = b ? routing::clean_key(r.P[e] + b[e]) : r.x[e];
  };
  for (int64_t t = 0; t < T; ++t) {
    row_probs(L + t * E, E, a.scoring, rows[t]);
    make_key(rows[t]);
    if (grouped) token_groups(rows[t], b, a, in_group[t]);
    topk(key, grouped ? &in_group[t] : nullptr, K, natural.data() + t * K);
    if (budget) {
      const float w = tw ? routing::clean_token_weight(tw[t]) : 1.f;
      for (int64_t e = 0; e < E; ++e) score[e] += w * rows[t].P[e];
    }
  }

  std::vector<char> kept(E, 1);
  std::vector<int32_t> slot_of(E);
  std::iota(slot_of.begin(), slot_of.end(), 0);
  if (budget) {
    std::vector<char> is_prot(E, 0);
    if (prot)
      for (int64_t t = 0; t < T; ++t)
        if (prot[t])
          for (int64_t k = 0; k < K; ++k) is_prot[natural[t * K + k]] = 1;
    std::vector<int32_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t x, int32_t y) {
      return is_prot[x] > is_prot[y] || (is_prot[x] == is_prot[y] && score[x] > score[y]);
    });
    std::fill(kept.begin(), kept.end(), 0);
    for (int64_t j = 0; j < Bk; ++j) kept[order[j]] = 1;
    for (int32_t e = 0, slot = 0; e < E; ++e) slot_of[e] = kept[e] ? slot++ : -1;
  }

  for (int64_t t = 0; t < T; ++t) {
    int32_t* id = ids + t * K;
    if (!budget) {
      std::copy(natural.begin() + t * K, natural.begin() + (t + 1) * K, id);
    } else if (a.policy == Policy::kSubstitute) {
      make_key(rows[t]);
      if (!grouped) {
        topk(key, &kept, K, id);
      } else {  // the kept experts of the token's groups first, then the other kept experts
        std::vector<char> first(E), second(E);
        for (int64_t e = 0; e < E; ++e) {
          first[e] = kept[e] && in_group[t][e];
          second[e] = kept[e] && !in_group[t][e];
        }
        const int64_t n = topk(key, &first, K, id);
        if (n < K) topk(key, &second, K - n, id + n);
      }
    } else {
      for (int64_t k = 0; k < K; ++k) id[k] = kept[natural[t * K + k]] ? natural[t * K + k] : -1;
    }
    float sum = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      W[t * K + k] = id[k] >= 0 ? rows[t].P[id[k]] : 0.f;
      sum += W[t * K + k];
    }
    if (renormalize)
      for (int64_t k = 0; k < K; ++k) W[t * K + k] = sum > 0.f ? W[t * K + k] / sum : 0.f;
    for (int64_t k = 0; k < K; ++k) W[t * K + k] *= a.scale;
  }

  if (group) {
    int32_t* kept_out = o.kept_experts.data_ptr<int32_t>();
    int32_t* counts = o.expert_counts.data_ptr<int32_t>();
    int32_t* offsets = o.expert_offsets.data_ptr<int32_t>();
    int32_t* pairs = o.sorted_pairs.data_ptr<int32_t>();
    for (int32_t e = 0; e < E; ++e)
      if (slot_of[e] >= 0) kept_out[slot_of[e]] = e;
    std::fill(counts, counts + Bk, 0);
    for (int64_t p = 0; p < T * K; ++p)
      if (ids[p] >= 0) ++counts[slot_of[ids[p]]];
    offsets[0] = 0;
    for (int64_t j = 0; j < Bk; ++j) offsets[j + 1] = offsets[j] + counts[j];
    std::vector<int32_t> cursor(offsets, offsets + Bk);
    for (int64_t p = 0; p < T * K; ++p)
      if (ids[p] >= 0) pairs[cursor[slot_of[ids[p]]]++] = static_cast<int32_t>(p);
    std::fill(pairs + offsets[Bk], pairs + T * K, -1);
  }
  return o;
}

RouteTopkResult route_topk_cpu(const at::Tensor& logits, int64_t top_k, c10::string_view scoring,
                               const std::optional<at::Tensor>& bias, bool renormalize, int64_t n_group,
                               int64_t topk_group, c10::string_view group_scoring, double scale) {
  const RouteArgs a = check_route_args("route_topk", logits, top_k, top_k, scoring, bias, std::nullopt,
                                       std::nullopt, "substitute", n_group, topk_group, group_scoring, scale);
  RouteArgs all = a;
  all.num_kept = a.E;
  RouteOutputs o = route_cpu(logits, all, bias, renormalize, std::nullopt, std::nullopt, false);
  return {o.weights, o.ids};
}

RouteBudgetResult route_budget_cpu(const at::Tensor& logits, int64_t top_k, int64_t budget,
                                   c10::string_view scoring, const std::optional<at::Tensor>& bias,
                                   bool renormalize, const std::optional<at::Tensor>& token_weights,
                                   const std::optional<at::Tensor>& protect, c10::string_view policy,
                                   int64_t n_group, int64_t topk_group, c10::string_view group_scoring,
                                   double scale) {
  const RouteArgs a = check_route_args("route_budget", logits, top_k, budget, scoring, bias,
                                       token_weights, protect, policy, n_group, topk_group, group_scoring, scale);
  return as_budget_result(route_cpu(logits, a, bias, renormalize, token_weights, protect, true));
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, CPU, m) {
  m.impl("route_topk", &route_topk_cpu);
  m.impl("route_budget", &route_budget_cpu);
}

}  // namespace specmoe
