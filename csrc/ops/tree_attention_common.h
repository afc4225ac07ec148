// Argument validation of specmoe::tree_attention, shared by the CPU, CUDA and Meta implementations: runs
// before any allocation or kernel and names the argument. Shapes: csrc/kernels/tree_attention.h.
//   check_attention_args   shapes, dtypes, strides, devices, scale (templates on the size type I: check.h)
//   check_prefix_lens      the prefix lengths' VALUES (host data, CPU): 0 <= prefix_lens[b] <= S - T.
//                          CUDA cannot see them without a sync: there slots outside [0, min(prefix + T, S))
//                          are never read instead (tree_attention.h).
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "../kernels/tree_attention.h"
#include "check.h"

namespace specmoe {

template <typename I>
struct AttentionArgsT {
  I bs, T, Hq, Hk, d, S;
};
using AttentionArgs = AttentionArgsT<int64_t>;

// `cuda`: also the CUDA kernel's limits (bf16/fp16, d in {64, 128}, 16-byte rows, grid sizes).
template <typename I = int64_t>
AttentionArgsT<I> check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& prefix_lens, const at::Tensor& tree_mask, double scale,
                                       bool cuda) {
  const char* op = "tree_attention";
  SPECMOE_CHECK(q.dim() == 4, op, ": q must be 4-D [bs, T, Hq, d], got shape ", sizes_of<I>(q));
  SPECMOE_CHECK(k.dim() == 4, op, ": k_cache must be 4-D [bs, Hk, S, d], got shape ", sizes_of<I>(k));
  SPECMOE_CHECK(sizes_of<I>(v) == sizes_of<I>(k), op, ": v_cache must have k_cache's shape ", sizes_of<I>(k),
                ", got ", sizes_of<I>(v));
  SPECMOE_CHECK(strides_of<I>(v) == strides_of<I>(k), op, ": v_cache must have k_cache's strides ",
                strides_of<I>(k), ", got ", strides_of<I>(v));
  AttentionArgsT<I> a{size_of<I>(q, 0), size_of<I>(q, 1), size_of<I>(q, 2),
                      size_of<I>(k, 1), size_of<I>(q, 3), size_of<I>(k, 2)};
  const auto st = q.scalar_type();
  SPECMOE_CHECK(st == at::kBFloat16 || st == at::kHalf || (!cuda && st == at::kFloat), op,
                ": q must be bfloat16 or float16", cuda ? "" : " (or float32 on CPU)", ", got ", st);
  SPECMOE_CHECK(k.scalar_type() == st && v.scalar_type() == st, op, ": k_cache and v_cache must have q's dtype ",
                st, ", got ", k.scalar_type(), " and ", v.scalar_type());
  SPECMOE_CHECK(size_of<I>(k, 0) == a.bs && size_of<I>(k, 3) == a.d, op, ": k_cache must be [bs, Hk, S, d] with bs = ",
                a.bs, " and d = ", a.d, ", got ", sizes_of<I>(k));
  SPECMOE_CHECK(a.T >= 1 && a.bs >= 1, op, ": need bs >= 1 and T >= 1, got q shape ", sizes_of<I>(q));
  SPECMOE_CHECK(a.d >= 1, op, ": head dim d = q.size(3) must be >= 1, got q shape ", sizes_of<I>(q));
  SPECMOE_CHECK(a.Hq >= 1 && a.Hk >= 1 && a.Hq % a.Hk == 0, op, ": the query heads Hq = ", a.Hq,
                " must be a positive multiple of the KV heads Hk = ", a.Hk);
  SPECMOE_CHECK(a.T <= a.S, op, ": T = ", a.T, " query tokens do not fit a cache row of ", a.S, " slots");
  SPECMOE_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  if (cuda)
    SPECMOE_CHECK(a.d == 64 || a.d == 128, op, ": head dim d must be 64 or 128 on CUDA, got ", a.d);
  SPECMOE_CHECK(stride_of<I>(q, 3) == 1 && stride_of<I>(k, 3) == 1, op,
                ": q and the caches need a contiguous last (d) dim");
  if (cuda) {
    for (const at::Tensor* t : {&q, &k})
      for (int i = 0; i < 3; ++i)
        SPECMOE_CHECK(stride_of<I>(*t, i) % 8 == 0, op, ": strides must be multiples of 8 elements (16-byte rows), got ",
                      strides_of<I>(*t));
    SPECMOE_CHECK(a.S < (int64_t(1) << 31) && a.bs * a.Hk <= 65535, op, ": bs * Hk = ", a.bs * a.Hk,
                  " must be <= 65535 and S < 2^31 on CUDA");
  }
  SPECMOE_CHECK(prefix_lens.dim() == 1 && size_of<I>(prefix_lens, 0) == a.bs && prefix_lens.scalar_type() == at::kLong,
                op, ": prefix_lens must be int64 [bs] with bs = ", a.bs, ", got ", prefix_lens.scalar_type(), " ",
                sizes_of<I>(prefix_lens));
  const I W = (a.T + 31) / 32;
  SPECMOE_CHECK(tree_mask.dim() == 3 && size_of<I>(tree_mask, 0) == a.bs && size_of<I>(tree_mask, 1) == a.T &&
                    size_of<I>(tree_mask, 2) == W && tree_mask.scalar_type() == at::kInt,
                op, ": tree_mask must be int32 [bs, T, ceil(T/32)] = [", a.bs, ", ", a.T, ", ", W, "], got ",
                tree_mask.scalar_type(), " ", sizes_of<I>(tree_mask));
  SPECMOE_CHECK(tree_mask.is_contiguous() && prefix_lens.is_contiguous(), op,
                ": tree_mask and prefix_lens must be contiguous");
  for (const at::Tensor* t : {&k, &v, &prefix_lens, &tree_mask})
    SPECMOE_CHECK(t->device() == q.device(), op, ": every argument must be on q's device ", q.device(),
                  ", got ", t->device());
  return a;
}

// prefix_lens on the host: request b's tree occupies slots prefix_b .. prefix_b + T - 1 of its cache row.
inline void check_prefix_lens(const AttentionArgs& a, const at::Tensor& prefix_lens) {
  const int64_t* pre = prefix_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < a.bs; ++b)
    SPECMOE_CHECK(pre[b] >= 0 && pre[b] <= a.S - a.T, "tree_attention: prefix_lens[", b, "] = ", pre[b],
                  " must be in [0, S - T] = [0, ", a.S - a.T, "] (the tree's T = ", a.T,
                  " slots follow the prefix in a cache row of S = ", a.S, ")");
}

}  // namespace specmoe
