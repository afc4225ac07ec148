// Argument validation of specmoe::tree_attention, shared by the CPU and CUDA implementations: runs
// before any allocation or kernel and names the argument. Shapes: csrc/kernels/tree_attention.h.
#pragma once

#include <ATen/ATen.h>

#include "../kernels/tree_attention.h"
#include "check.h"

namespace specmoe {

struct AttentionArgs {
  int64_t bs, T, Hq, Hk, d, S;
};

inline AttentionArgs check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& prefix_lens, const at::Tensor& tree_mask,
                                          bool cuda) {
  const char* op = "tree_attention";
  SPECMOE_CHECK(q.dim() == 4, op, ": q must be 4-D [bs, T, Hq, d], got shape ", q.sizes());
  SPECMOE_CHECK(k.dim() == 4, op, ": k_cache must be 4-D [bs, Hk, S, d], got shape ", k.sizes());
  SPECMOE_CHECK(v.sizes() == k.sizes(), op, ": v_cache must have k_cache's shape ", k.sizes(), ", got ",
                v.sizes());
  SPECMOE_CHECK(v.strides() == k.strides(), op, ": v_cache must have k_cache's strides ", k.strides(),
                ", got ", v.strides());
  AttentionArgs a{q.size(0), q.size(1), q.size(2), k.size(1), q.size(3), k.size(2)};
  const auto st = q.scalar_type();
  SPECMOE_CHECK(st == at::kBFloat16 || st == at::kHalf || (!cuda && st == at::kFloat), op,
                ": q must be bfloat16 or float16", cuda ? "" : " (or float32 on CPU)", ", got ", st);
  SPECMOE_CHECK(k.scalar_type() == st && v.scalar_type() == st, op, ": k_cache and v_cache must have q's dtype ",
                st, ", got ", k.scalar_type(), " and ", v.scalar_type());
  SPECMOE_CHECK(k.size(0) == a.bs && k.size(3) == a.d, op, ": k_cache must be [bs, Hk, S, d] with bs = ", a.bs,
                " and d = ", a.d, ", got ", k.sizes());
  SPECMOE_CHECK(a.T >= 1 && a.bs >= 1, op, ": need bs >= 1 and T >= 1, got q shape ", q.sizes());
  SPECMOE_CHECK(a.Hk >= 1 && a.Hq % a.Hk == 0, op, ": the query heads Hq = ", a.Hq,
                " must be a multiple of the KV heads Hk = ", a.Hk);
  SPECMOE_CHECK(a.T <= a.S, op, ": T = ", a.T, " query tokens do not fit a cache row of ", a.S, " slots");
  if (cuda)
    SPECMOE_CHECK(a.d == 64 || a.d == 128, op, ": head dim d must be 64 or 128 on CUDA, got ", a.d);
  SPECMOE_CHECK(q.stride(3) == 1 && k.stride(3) == 1, op, ": q and the caches need a contiguous last (d) dim");
  if (cuda) {
    for (const at::Tensor* t : {&q, &k})
      for (int i = 0; i < 3; ++i)
        SPECMOE_CHECK(t->stride(i) % 8 == 0, op, ": strides must be multiples of 8 elements (16-byte rows), got ",
                      t->strides());
  }
  SPECMOE_CHECK(prefix_lens.dim() == 1 && prefix_lens.size(0) == a.bs && prefix_lens.scalar_type() == at::kLong,
                op, ": prefix_lens must be int64 [bs] with bs = ", a.bs, ", got ", prefix_lens.scalar_type(), " ",
                prefix_lens.sizes());
  const int64_t W = (a.T + 31) / 32;
  SPECMOE_CHECK(tree_mask.dim() == 3 && tree_mask.size(0) == a.bs && tree_mask.size(1) == a.T &&
                    tree_mask.size(2) == W && tree_mask.scalar_type() == at::kInt,
                op, ": tree_mask must be int32 [bs, T, ceil(T/32)] = [", a.bs, ", ", a.T, ", ", W, "], got ",
                tree_mask.scalar_type(), " ", tree_mask.sizes());
  SPECMOE_CHECK(tree_mask.is_contiguous() && prefix_lens.is_contiguous(), op,
                ": tree_mask and prefix_lens must be contiguous");
  for (const at::Tensor* t : {&k, &v, &prefix_lens, &tree_mask})
    SPECMOE_CHECK(t->device() == q.device(), op, ": every argument must be on q's device ", q.device(),
                  ", got ", t->device());
  return a;
}

}  // namespace specmoe
