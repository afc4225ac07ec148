// Meta (fake) kernel of specmoe::tree_accept: the CPU/CUDA argument checks (tree_accept_common.h, with
// symbolic sizes) and empty outputs path [bs, T], n_accepted [bs], bonus [bs] (int64). `offset`, which the
// real kernels advance in place, has no data to advance here.
#include <torch/library.h>

#include <tuple>

#include "tree_accept_common.h"

namespace specmoe {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_accept_meta(
    const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& parent, const at::Tensor& valid,
    double temperature, double top_p, int64_t top_k, const at::Tensor& seed, const at::Tensor& offset) {
  const auto a = check_tree_accept_args<c10::SymInt>(logits, tokens, parent, valid, temperature, top_p, top_k,
                                                     seed, offset);
  const auto i64 = tokens.options();
  return {empty_sized<c10::SymInt>({a.bs, a.T}, i64), empty_sized<c10::SymInt>({a.bs}, i64),
          empty_sized<c10::SymInt>({a.bs}, i64)};
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, Meta, m) { m.impl("tree_accept", &tree_accept_meta); }

}  // namespace specmoe
