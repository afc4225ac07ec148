// CPU implementation of specmoe::tree_attention: dense masked attention in float32 (ATen), the same
// visibility rule as the CUDA kernel (prefix slots + the tree slots the ancestor bitmask names). The
// prefix lengths are host data here, so their values are checked too (check_prefix_lens).
#include <torch/library.h>

#include <limits>

#include "tree_attention_common.h"

namespace specmoe {
namespace {

at::Tensor tree_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& prefix_lens, const at::Tensor& tree_mask, double scale,
                              int64_t /*kv_len_hint*/) {
  const AttentionArgs a = check_attention_args(q, k_cache, v_cache, prefix_lens, tree_mask, scale, false);
  check_prefix_lens(a, prefix_lens);
  const auto opts = prefix_lens.options();
  // visible[b, t, s] = s < prefix_b, or s = prefix_b + j with bit j of tree_mask[b, t] (j < T)
  const at::Tensor cols = at::arange(a.S, opts);                                  // [S]
  const at::Tensor prefix = prefix_lens.view({a.bs, 1, 1});
  const at::Tensor j = cols.view({1, 1, a.S}) - prefix;                           // [bs, 1, S]
  const at::Tensor in_tree = (j >= 0) & (j < a.T);
  const at::Tensor jc = j.clamp(0, a.T - 1);
  const at::Tensor words = tree_mask.to(at::kLong).bitwise_and(0xffffffffLL);     // [bs, T, W]
  const at::Tensor word = at::take_along_dim(words, at::floor_divide(jc, 32).expand({a.bs, a.T, a.S}), 2);
  const at::Tensor bit = word.bitwise_right_shift(at::remainder(jc, 32)).bitwise_and(1).to(at::kBool);
  const at::Tensor visible = (j < 0) | (in_tree & bit);                           // [bs, T, S]

  const int64_t rep = a.Hq / a.Hk;
  const at::Tensor qf = q.to(at::kFloat).permute({0, 2, 1, 3});                   // [bs, Hq, T, d]
  const at::Tensor kf = k_cache.to(at::kFloat).repeat_interleave(rep, 1);         // [bs, Hq, S, d]
  const at::Tensor vf = v_cache.to(at::kFloat).repeat_interleave(rep, 1);
  at::Tensor scores = at::matmul(qf, kf.transpose(2, 3)) * scale;                 // [bs, Hq, T, S]
  scores = scores.masked_fill(visible.logical_not().unsqueeze(1), -std::numeric_limits<float>::infinity());
  at::Tensor probs = at::softmax(scores, -1);
  probs = at::nan_to_num(probs, 0.0);                                             // rows with nothing visible
  const at::Tensor out = at::matmul(probs, vf);                                   // [bs, Hq, T, d]
  return out.permute({0, 2, 1, 3}).contiguous().to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, CPU, m) { m.impl("tree_attention", &tree_attention_cpu); }

}  // namespace specmoe
