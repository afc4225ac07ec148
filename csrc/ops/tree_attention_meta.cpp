// Meta (fake) kernel of specmoe::tree_attention: the CPU/CUDA argument checks (tree_attention_common.h,
// with symbolic sizes; the CUDA rules when the fake tensors stand for CUDA ones) and an empty output
// [bs, T, Hq, d] contiguous in q's dtype. prefix_lens' values are data, which a meta tensor has none of.
#include <torch/library.h>

#include "tree_attention_common.h"

namespace specmoe {
namespace {

at::Tensor tree_attention_meta(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& prefix_lens, const at::Tensor& tree_mask, double scale,
                               int64_t /*kv_len_hint*/) {
  const auto a = check_attention_args<c10::SymInt>(q, k_cache, v_cache, prefix_lens, tree_mask, scale,
                                                    meta_stands_for_cuda(q));
  return empty_sized<c10::SymInt>({a.bs, a.T, a.Hq, a.d}, q.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, Meta, m) { m.impl("tree_attention", &tree_attention_meta); }

}  // namespace specmoe
