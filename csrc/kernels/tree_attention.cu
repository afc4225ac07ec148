// Instantiates the tree-attention kernels (bf16, fp16 x d 64, 128) behind the torch-free launcher.
#include "tree_attention.cuh"

namespace specmoe {
namespace tree_attention {

cudaError_t launch_tree_attention(const TreeAttentionParams& p, cudaStream_t stream) {
  if (p.bs < 1 || p.T < 1 || p.Hk < 1 || p.Hq % p.Hk != 0 || p.S < 1 || p.num_splits < 1 ||
      p.num_splits > kMaxSplits || (p.num_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr)))
    return cudaErrorInvalidValue;
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.d == 128) return bf16 ? detail::launch_typed<__nv_bfloat16, 128>(p, stream)
                              : detail::launch_typed<__half, 128>(p, stream);
  if (p.d == 64) return bf16 ? detail::launch_typed<__nv_bfloat16, 64>(p, stream)
                             : detail::launch_typed<__half, 64>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace tree_attention
}  // namespace specmoe
