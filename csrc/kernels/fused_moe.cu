// Instantiates the fused MoE kernels (bf16, fp16) behind the torch-free launcher.
#include "fused_moe.cuh"

namespace specmoe {
namespace fused_moe {

cudaError_t launch_fused_moe(const MoeParams& p, cudaStream_t stream) {
  if (p.h % 64 != 0 || p.f % 64 != 0 || p.K < 1 || p.K > 16 || p.num_kept < 1 ||
      p.num_kept > kMaxExperts || p.T < 0)
    return cudaErrorInvalidValue;
  if (p.shared.w13 != nullptr && (p.shared.w2 == nullptr || p.shared.weight == nullptr || p.shared.act == nullptr ||
                                  p.shared.out == nullptr || p.shared.fs <= 0 || p.shared.fs % 64 != 0))
    return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kBFloat16: return detail::launch_typed<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return detail::launch_typed<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fused_moe
}  // namespace specmoe
