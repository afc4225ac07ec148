// CPU implementation of specmoe::fused_moe: per kept expert with pairs, one GEMM pair over its tokens
// (ATen), each token's expert outputs accumulated in float32 in ascending kept-expert order. Reads the
// routing on the host (it is on the CPU), so the grouping's values are validated first, always
// (check_grouping). Batch-invariant: the GEMMs run on chunks of exactly kRowChunk rows (zero-padded), so a
// token's result does not depend on how many other tokens share its experts (a GEMM library picks its
// blocking by shape); bench/bench_invariance.py and tests/test_invariant.py check it.
#include <torch/library.h>

#include <vector>

#include "fused_moe_common.h"

namespace specmoe {
namespace {

constexpr int64_t kRowChunk = 16;

// a [m, k] float32 x bt [k, n] -> [m, n], on chunks of exactly kRowChunk rows.
at::Tensor chunked_matmul(const at::Tensor& a, const at::Tensor& bt) {
  const int64_t m = a.size(0);
  const int64_t pad = (kRowChunk - m % kRowChunk) % kRowChunk;
  const at::Tensor ap = pad ? at::cat({a, at::zeros({pad, a.size(1)}, a.options())}) : a;
  std::vector<at::Tensor> outs;
  outs.reserve(ap.size(0) / kRowChunk);
  for (int64_t i = 0; i < ap.size(0); i += kRowChunk) outs.push_back(at::matmul(ap.slice(0, i, i + kRowChunk), bt));
  return at::cat(outs).slice(0, 0, m);
}

at::Tensor fused_moe_cpu(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                         const at::Tensor& weights, const at::Tensor& kept, const at::Tensor& counts,
                         const at::Tensor& offsets, const at::Tensor& pairs,
                         const c10::optional<at::Tensor>& shared_w13, const c10::optional<at::Tensor>& shared_w2,
                         const c10::optional<at::Tensor>& shared_weight) {
  const MoeArgs a = check_moe_args(x, w13, w2, weights, kept, counts, offsets, pairs, false);
  const int64_t fs = check_shared_expert(x, shared_w13, shared_w2, shared_weight);
  check_grouping(a, weights, kept, counts, offsets, pairs);
  at::Tensor y = at::zeros({a.T, a.h}, x.options().dtype(at::kFloat));
  const int32_t* kp = kept.data_ptr<int32_t>();
  const int32_t* cp = counts.data_ptr<int32_t>();
  const int32_t* op = offsets.data_ptr<int32_t>();
  const at::Tensor flat_w = weights.reshape({-1});
  for (int64_t j = 0; j < a.num_kept; ++j) {
    if (cp[j] <= 0) continue;
    const int64_t e = kp[j];
    const at::Tensor p = pairs.slice(0, op[j], op[j] + cp[j]).to(at::kLong);
    const at::Tensor tok = at::floor_divide(p, a.K);
    const at::Tensor xs = x.index_select(0, tok).to(at::kFloat);
    const at::Tensor gu = chunked_matmul(xs, w13[e].to(at::kFloat).t());
    // act is rounded to the activation dtype, as the CUDA kernel stores it
    const at::Tensor act = (at::silu(gu.slice(1, 0, a.f)) * gu.slice(1, a.f, 2 * a.f)).to(x.scalar_type());
    const at::Tensor out = chunked_matmul(act.to(at::kFloat), w2[e].to(at::kFloat).t());
    y.index_add_(0, tok, out * flat_w.index_select(0, p).unsqueeze(1));
  }
  if (fs > 0) {  // every token, weighted by shared_weight; act rounded as on the GPU
    const at::Tensor gu = chunked_matmul(x.to(at::kFloat), shared_w13->to(at::kFloat).t());
    const at::Tensor act = (at::silu(gu.slice(1, 0, fs)) * gu.slice(1, fs, 2 * fs)).to(x.scalar_type());
    y.add_(chunked_matmul(act.to(at::kFloat), shared_w2->to(at::kFloat).t()) * shared_weight->unsqueeze(1));
  }
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, CPU, m) { m.impl("fused_moe", &fused_moe_cpu); }

}  // namespace specmoe
