// Argument validation of specmoe::fused_moe, shared by the CPU, CUDA and Meta implementations: runs before
// any allocation or kernel and names the argument. Shapes: csrc/kernels/fused_moe.h.
//   check_moe_args / check_shared_expert   shapes, dtypes, devices (templates on the size type I: check.h)
//   check_grouping                         the routing's VALUES (host data): on CPU always, on CUDA only
//                                          with SPECMOE_CHECK_ROUTING=1 (fused_moe_cuda.cpp)
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "../kernels/fused_moe.h"
#include "check.h"

namespace specmoe {

template <typename I>
struct MoeArgsT {
  I T, h, f, E, K, num_kept;
};
using MoeArgs = MoeArgsT<int64_t>;

// Optional shared expert: all three tensors or none. -> fs (0 = none).
template <typename I = int64_t>
I check_shared_expert(const at::Tensor& x, const c10::optional<at::Tensor>& w13, const c10::optional<at::Tensor>& w2,
                      const c10::optional<at::Tensor>& weight) {
  const char* op = "fused_moe";
  const int n = int(w13.has_value()) + int(w2.has_value()) + int(weight.has_value());
  SPECMOE_CHECK(n == 0 || n == 3, op, ": shared_w13, shared_w2 and shared_weight go together (got ", n, " of 3)");
  if (n == 0) return I(0);
  const I T = size_of<I>(x, 0), h = size_of<I>(x, 1);
  SPECMOE_CHECK(w13->dim() == 2 && size_of<I>(*w13, 1) == h && size_of<I>(*w13, 0) % 2 == 0, op,
                ": shared_w13 must have shape [2fs, h] with h = ", h, ", got ", sizes_of<I>(*w13));
  const I fs = size_of<I>(*w13, 0) / 2;
  SPECMOE_CHECK(fs % 64 == 0 && fs > 0, op, ": the shared-expert FFN size fs = shared_w13.size(0) / 2 must be a "
                "positive multiple of 64, got ", fs);
  SPECMOE_CHECK(w2->dim() == 2 && size_of<I>(*w2, 0) == h && size_of<I>(*w2, 1) == fs, op,
                ": shared_w2 must have shape [h, fs] = [", h, ", ", fs, "], got ", sizes_of<I>(*w2));
  for (const at::Tensor* w : {&*w13, &*w2}) {
    SPECMOE_CHECK(w->scalar_type() == x.scalar_type(), op, ": shared-expert weights must have x's dtype ",
                  x.scalar_type(), ", got ", w->scalar_type());
    SPECMOE_CHECK(w->is_contiguous(), op, ": shared-expert weights must be contiguous");
    SPECMOE_CHECK(w->device() == x.device(), op, ": shared-expert weights are on ", w->device(), " but x is on ", x.device());
  }
  SPECMOE_CHECK(weight->dim() == 1 && size_of<I>(*weight, 0) == T && weight->scalar_type() == at::kFloat &&
                    weight->is_contiguous() && weight->device() == x.device(),
                op, ": shared_weight must be a contiguous float32 [T] tensor on x's device with T = ", T, ", got ",
                weight->scalar_type(), " ", sizes_of<I>(*weight), " on ", weight->device());
  return fs;
}

// x [T, h], w13 [E, 2f, h], w2 [E, h, f] and the routing's shapes. `cuda`: the CUDA kernels' rules.
template <typename I = int64_t>
MoeArgsT<I> check_moe_args(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                           const at::Tensor& weights, const at::Tensor& kept, const at::Tensor& counts,
                           const at::Tensor& offsets, const at::Tensor& pairs, bool cuda) {
  const char* op = "fused_moe";
  SPECMOE_CHECK(x.dim() == 2, op, ": x must be 2-D [T, h], got shape ", sizes_of<I>(x));
  const auto st = x.scalar_type();
  SPECMOE_CHECK(st == at::kBFloat16 || st == at::kHalf || (!cuda && st == at::kFloat), op,
                ": x must be bfloat16 or float16", cuda ? "" : " (or float32 on CPU)", ", got ", st);
  SPECMOE_CHECK(x.is_contiguous(), op, ": x must be contiguous, got strides ", strides_of<I>(x));
  MoeArgsT<I> a{size_of<I>(x, 0), size_of<I>(x, 1), I(0), I(0), I(0), I(0)};
  SPECMOE_CHECK(a.h % 64 == 0, op, ": the hidden size h = x.size(1) must be a multiple of 64, got ", a.h);
  // w13 alone first (E, f and h from it), then w2 against it: each error names the tensor at fault.
  SPECMOE_CHECK(w13.dim() == 3 && size_of<I>(w13, 2) == a.h && size_of<I>(w13, 1) % 2 == 0, op,
                ": w13 must have shape [E, 2f, h] with h = ", a.h, ", got ", sizes_of<I>(w13));
  a.E = size_of<I>(w13, 0);
  a.f = size_of<I>(w13, 1) / 2;
  SPECMOE_CHECK(a.f % 64 == 0 && a.f > 0, op, ": the expert FFN size f = w13.size(1) / 2 must be a positive "
                "multiple of 64, got ", a.f, " (w13 shape ", sizes_of<I>(w13), ")");
  SPECMOE_CHECK(a.E >= 1 && a.E <= fused_moe::kMaxExperts, op, ": the number of experts E = w13.size(0) must be in [1, ",
                int(fused_moe::kMaxExperts), "], got ", a.E);
  SPECMOE_CHECK(w2.dim() == 3 && size_of<I>(w2, 0) == a.E && size_of<I>(w2, 1) == a.h && size_of<I>(w2, 2) == a.f, op,
                ": w2 must have shape [E, h, f] = [", a.E, ", ", a.h, ", ", a.f, "] (E and f from w13 ",
                sizes_of<I>(w13), ", h from x), got ", sizes_of<I>(w2));
  for (const at::Tensor* w : {&w13, &w2}) {
    SPECMOE_CHECK(w->scalar_type() == st, op, ": expert weights must have x's dtype ", st, ", got ",
                  w->scalar_type());
    SPECMOE_CHECK(w->is_contiguous(), op, ": expert weights must be contiguous");
    SPECMOE_CHECK(w->device() == x.device(), op, ": expert weights are on ", w->device(),
                  " but x is on ", x.device());
  }
  SPECMOE_CHECK(weights.dim() == 2 && size_of<I>(weights, 0) == a.T && weights.scalar_type() == at::kFloat, op,
                ": weights must be float32 [T, K] with T = ", a.T, ", got ", weights.scalar_type(), " ",
                sizes_of<I>(weights));
  SPECMOE_CHECK(weights.is_contiguous(), op, ": weights must be contiguous");
  a.K = size_of<I>(weights, 1);
  SPECMOE_CHECK(a.K >= 1 && a.K <= 16, op, ": K = weights.size(1) must be in [1, 16], got ", a.K);
  SPECMOE_CHECK(kept.dim() == 1, op, ": kept_experts must be 1-D [Bk], got ", sizes_of<I>(kept));
  a.num_kept = size_of<I>(kept, 0);
  SPECMOE_CHECK(a.num_kept >= 1 && a.num_kept <= a.E, op, ": kept_experts must have 1..E = ", a.E,
                " entries, got ", a.num_kept);
  const struct {
    const at::Tensor* t;
    const char* name;
    I len;
  } ints[] = {{&kept, "kept_experts", a.num_kept},
              {&counts, "expert_counts", a.num_kept},
              {&offsets, "expert_offsets", a.num_kept + 1},
              {&pairs, "sorted_pairs", a.T * a.K}};
  for (const auto& it : ints) {
    SPECMOE_CHECK(it.t->dim() == 1 && size_of<I>(*it.t, 0) == it.len && it.t->scalar_type() == at::kInt, op,
                  ": ", it.name, " must be int32 [", it.len, "], got ", it.t->scalar_type(), " ",
                  sizes_of<I>(*it.t));
    SPECMOE_CHECK(it.t->is_contiguous(), op, ": ", it.name, " must be contiguous");
  }
  for (const at::Tensor* t : {&weights, &kept, &counts, &offsets, &pairs})
    SPECMOE_CHECK(t->device() == x.device(), op, ": routing tensors must be on x's device ", x.device(),
                  ", got ", t->device());
  return a;
}

// The routing's values, on host copies (CPU tensors, shapes already checked): the grouping the kernels
// trust. kept_experts distinct ids in [0, E); expert_counts >= 0; expert_offsets[0] = 0 and
// expert_offsets[j + 1] = expert_offsets[j] + expert_counts[j], the total <= T * K; each slot's
// sorted_pairs segment strictly ascending flat pair ids in [0, T * K), no pair in two slots; and every
// pair with a nonzero weight grouped (the CUDA combine reads exactly those pairs' rows).
inline void check_grouping(const MoeArgs& a, const at::Tensor& weights, const at::Tensor& kept,
                           const at::Tensor& counts, const at::Tensor& offsets, const at::Tensor& pairs) {
  const char* op = "fused_moe";
  const int32_t *kp = kept.data_ptr<int32_t>(), *cp = counts.data_ptr<int32_t>();
  const int32_t *op_ = offsets.data_ptr<int32_t>(), *pp = pairs.data_ptr<int32_t>();
  const float* w = weights.data_ptr<float>();
  const int64_t N = a.T * a.K;
  std::vector<char> expert_seen(size_t(a.E), 0), pair_seen(size_t(N), 0);
  SPECMOE_CHECK(op_[0] == 0, op, ": expert_offsets[0] must be 0, got ", int(op_[0]));
  for (int64_t j = 0; j < a.num_kept; ++j) {
    const int64_t e = kp[j], c = cp[j], lo = op_[j], hi = op_[j + 1];
    SPECMOE_CHECK(e >= 0 && e < a.E, op, ": kept_experts[", j, "] = ", e, " is not an expert id in [0, ", a.E, ")");
    SPECMOE_CHECK(!expert_seen[size_t(e)], op, ": expert ", e, " is kept twice (kept_experts[", j, "])");
    expert_seen[size_t(e)] = 1;
    SPECMOE_CHECK(c >= 0, op, ": expert_counts[", j, "] = ", c, " is negative");
    SPECMOE_CHECK(hi == lo + c, op, ": expert_offsets[", j + 1, "] = ", hi, " must be expert_offsets[", j,
                  "] + expert_counts[", j, "] = ", lo + c);
    SPECMOE_CHECK(hi <= N, op, ": expert_offsets[", j + 1, "] = ", hi, " exceeds the T * K = ", N, " pairs");
    for (int64_t q = lo; q < hi; ++q) {
      const int64_t pair = pp[q];
      SPECMOE_CHECK(pair >= 0 && pair < N, op, ": sorted_pairs[", q, "] = ", pair, " (slot ", j,
                    ") is not a pair id in [0, T * K = ", N, ")");
      SPECMOE_CHECK(q == lo || pair > pp[q - 1], op, ": sorted_pairs[", lo, ":", hi, "] (slot ", j,
                    ") must be strictly ascending, got ", int64_t(pp[q - 1]), " then ", pair, " at ", q);
      SPECMOE_CHECK(!pair_seen[size_t(pair)], op, ": pair ", pair, " is grouped under two slots (sorted_pairs[",
                    q, "])");
      pair_seen[size_t(pair)] = 1;
    }
  }
  for (int64_t pair = 0; pair < N; ++pair)
    SPECMOE_CHECK(pair_seen[size_t(pair)] || w[pair] == 0.f, op, ": weights[", pair / a.K, ", ", pair % a.K,
                  "] = ", double(w[pair]), " but pair ", pair, " is in no slot's sorted_pairs (weight 0 or group it)");
}

}  // namespace specmoe
