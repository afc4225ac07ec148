// CUDA adapter of specmoe::tree_attention: checks, output and split workspace, stream, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdlib>

#include "tree_attention_common.h"
#include "cuda_device.h"

namespace specmoe {
namespace {

at::Tensor tree_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& prefix_lens, const at::Tensor& tree_mask, double scale,
                               int64_t kv_len_hint) {
  const AttentionArgs a = check_attention_args(q, k_cache, v_cache, prefix_lens, tree_mask, scale, true);
  const c10::cuda::CUDAGuard guard(q.device());
  namespace ta = tree_attention;
  ta::TreeAttentionParams p;
  p.q = q.data_ptr();
  p.q_stride_b = q.stride(0);
  p.q_stride_t = q.stride(1);
  p.q_stride_h = q.stride(2);
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.kv_stride_b = k_cache.stride(0);
  p.kv_stride_h = k_cache.stride(1);
  p.kv_stride_s = k_cache.stride(2);
  p.prefix_lens = prefix_lens.data_ptr<int64_t>();
  p.tree_mask = tree_mask.data_ptr<int32_t>();
  p.bs = int(a.bs);
  p.T = int(a.T);
  p.Hq = int(a.Hq);
  p.Hk = int(a.Hk);
  p.d = int(a.d);
  p.S = int(a.S);
  p.scale = float(scale);
  p.dtype = q.scalar_type() == at::kBFloat16 ? ta::DType::kBFloat16 : ta::DType::kFloat16;
  const int tiles = ta::row_tiles(p);
  const int hint = int(kv_len_hint > 0 && kv_len_hint < a.S ? kv_len_hint : a.S);
  p.num_splits = ta::choose_splits(p.bs, p.Hk, tiles, p.T * (p.Hq / p.Hk), hint,
                                   multiprocessor_count(q.get_device()));
  // Tuning knob for benchmarks: SPECMOE_TREE_ATTN_SPLITS=n forces the split count (1..64).
  static const int forced = [] {
    const char* e = std::getenv("SPECMOE_TREE_ATTN_SPLITS");
    return e ? std::atoi(e) : 0;
  }();
  if (forced >= 1 && forced <= ta::kMaxSplits) p.num_splits = forced;
  at::Tensor out = at::empty({a.bs, a.T, a.Hq, a.d}, q.options());
  p.out = out.data_ptr();
  at::Tensor partial_out, partial_lse;
  if (p.num_splits > 1) {
    const int64_t slots = a.bs * a.Hk * tiles * p.num_splits * ta::kRowTile;
    partial_out = at::empty({slots * a.d}, q.options().dtype(at::kFloat));
    partial_lse = at::empty({slots}, q.options().dtype(at::kFloat));
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_lse = partial_lse.data_ptr<float>();
  }
  const cudaError_t err = ta::launch_tree_attention(p, c10::cuda::getCurrentCUDAStream());
  SPECMOE_CHECK(err == cudaSuccess, "tree_attention: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, CUDA, m) { m.impl("tree_attention", &tree_attention_cuda); }

}  // namespace specmoe
