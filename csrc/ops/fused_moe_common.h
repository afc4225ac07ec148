// Argument validation of specmoe::fused_moe, shared by the CPU and CUDA implementations: runs before
// any allocation or kernel and names the argument. Shapes: csrc/kernels/fused_moe.h.
#pragma once

#include <ATen/ATen.h>

#include "../kernels/fused_moe.h"
#include "check.h"

namespace specmoe {

struct MoeArgs {
  int64_t T, h, f, E, K, num_kept;
  int64_t fs = 0;  // shared-expert FFN size; 0 = none
};

// Optional shared expert: all three tensors or none. -> fs (0 = none).
inline int64_t check_shared_expert(const at::Tensor& x, const c10::optional<at::Tensor>& w13,
                                   const c10::optional<at::Tensor>& w2, const c10::optional<at::Tensor>& weight) {
  const char* op = "fused_moe";
  const int n = int(w13.has_value()) + int(w2.has_value()) + int(weight.has_value());
  SPECMOE_CHECK(n == 0 || n == 3, op, ": shared_w13, shared_w2 and shared_weight go together (got ", n, " of 3)");
  if (n == 0) return 0;
  const int64_t T = x.size(0), h = x.size(1);
  SPECMOE_CHECK(w13->dim() == 2 && w13->size(1) == h && w13->size(0) % 2 == 0, op,
                ": shared_w13 must have shape [2fs, h] with h = ", h, ", got ", w13->sizes());
  const int64_t fs = w13->size(0) / 2;
  SPECMOE_CHECK(fs % 64 == 0 && fs > 0, op, ": the shared-expert FFN size fs must be a positive multiple of 64, got ", fs);
  SPECMOE_CHECK(w2->dim() == 2 && w2->size(0) == h && w2->size(1) == fs, op, ": shared_w2 must have shape [h, fs] = [",
                h, ", ", fs, "], got ", w2->sizes());
  for (const at::Tensor* w : {&*w13, &*w2}) {
    SPECMOE_CHECK(w->scalar_type() == x.scalar_type(), op, ": shared-expert weights must have x's dtype ",
                  x.scalar_type(), ", got ", w->scalar_type());
    SPECMOE_CHECK(w->is_contiguous(), op, ": shared-expert weights must be contiguous");
    SPECMOE_CHECK(w->device() == x.device(), op, ": shared-expert weights are on ", w->device(), " but x is on ", x.device());
  }
  SPECMOE_CHECK(weight->dim() == 1 && weight->size(0) == T && weight->scalar_type() == at::kFloat &&
                    weight->is_contiguous() && weight->device() == x.device(),
                op, ": shared_weight must be a contiguous float32 [T] tensor on x's device with T = ", T, ", got ",
                weight->scalar_type(), " ", weight->sizes(), " on ", weight->device());
  return fs;
}

inline MoeArgs check_moe_args(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                              const at::Tensor& weights, const at::Tensor& kept,
                              const at::Tensor& counts, const at::Tensor& offsets,
                              const at::Tensor& pairs, bool cuda) {
  const char* op = "fused_moe";
  SPECMOE_CHECK(x.dim() == 2, op, ": x must be 2-D [T, h], got shape ", x.sizes());
  const auto st = x.scalar_type();
  SPECMOE_CHECK(st == at::kBFloat16 || st == at::kHalf || (!cuda && st == at::kFloat), op,
                ": x must be bfloat16 or float16", cuda ? "" : " (or float32 on CPU)", ", got ", st);
  SPECMOE_CHECK(x.is_contiguous(), op, ": x must be contiguous, got strides ", x.strides());
  MoeArgs a;
  a.T = x.size(0);
  a.h = x.size(1);
  SPECMOE_CHECK(w13.dim() == 3 && w13.size(2) == a.h && w13.size(1) % 2 == 0, op,
                ": w13 must have shape [E, 2f, h] with h = ", a.h, ", got ", w13.sizes());
  a.E = w13.size(0);
  a.f = w13.size(1) / 2;
  SPECMOE_CHECK(w2.dim() == 3 && w2.size(0) == a.E && w2.size(1) == a.h && w2.size(2) == a.f, op,
                ": w2 must have shape [E, h, f] = [", a.E, ", ", a.h, ", ", a.f, "], got ", w2.sizes());
  SPECMOE_CHECK(a.h % 64 == 0, op, ": the hidden size h must be a multiple of 64, got ", a.h);
  SPECMOE_CHECK(a.f % 64 == 0, op, ": the expert FFN size f must be a multiple of 64, got ", a.f);
  SPECMOE_CHECK(a.E >= 1 && a.E <= fused_moe::kMaxExperts, op, ": the number of experts must be in [1, ",
                int(fused_moe::kMaxExperts), "], got ", a.E);
  for (const at::Tensor* w : {&w13, &w2}) {
    SPECMOE_CHECK(w->scalar_type() == st, op, ": expert weights must have x's dtype ", st, ", got ",
                  w->scalar_type());
    SPECMOE_CHECK(w->is_contiguous(), op, ": expert weights must be contiguous");
    SPECMOE_CHECK(w->device() == x.device(), op, ": expert weights are on ", w->device(),
                  " but x is on ", x.device());
  }
  SPECMOE_CHECK(weights.dim() == 2 && weights.size(0) == a.T && weights.scalar_type() == at::kFloat, op,
                ": weights must be float32 [T, K] with T = ", a.T, ", got ", weights.scalar_type(), " ",
                weights.sizes());
  a.K = weights.size(1);
  SPECMOE_CHECK(a.K >= 1 && a.K <= 16, op, ": K = weights.size(1) must be in [1, 16], got ", a.K);
  SPECMOE_CHECK(kept.dim() == 1, op, ": kept_experts must be 1-D [Bk], got ", kept.sizes());
  a.num_kept = kept.size(0);
  SPECMOE_CHECK(a.num_kept >= 1 && a.num_kept <= a.E, op, ": kept_experts must have 1..E = ", a.E,
                " entries, got ", a.num_kept);
  const struct {
    const at::Tensor* t;
    const char* name;
    int64_t len;
  } ints[] = {{&kept, "kept_experts", a.num_kept},
              {&counts, "expert_counts", a.num_kept},
              {&offsets, "expert_offsets", a.num_kept + 1},
              {&pairs, "sorted_pairs", a.T * a.K}};
  for (const auto& it : ints) {
    SPECMOE_CHECK(it.t->dim() == 1 && it.t->size(0) == it.len && it.t->scalar_type() == at::kInt, op,
                  ": ", it.name, " must be int32 [", it.len, "], got ", it.t->scalar_type(), " ",
                  it.t->sizes());
    SPECMOE_CHECK(it.t->is_contiguous(), op, ": ", it.name, " must be contiguous");
  }
  for (const at::Tensor* t : {&weights, &kept, &counts, &offsets, &pairs})
    SPECMOE_CHECK(t->device() == x.device(), op, ": routing tensors must be on x's device ", x.device(),
                  ", got ", t->device());
  return a;
}

}  // namespace specmoe
