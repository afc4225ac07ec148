// Instantiates the tree acceptance kernels (bf16, fp16, fp32) behind the torch-free launcher.
#include "tree_accept.cuh"

namespace specmoe {
namespace tree_accept {

cudaError_t launch_tree_accept(const TreeAcceptParams& p, cudaStream_t stream) {
  if (p.bs < 0 || p.T < 1 || p.T > kMaxNodes || p.V < 1 || p.V > kMaxVocab || p.bs > 65535)
    return cudaErrorInvalidValue;
  if (p.bs == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kBFloat16: return detail::launch_typed<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return detail::launch_typed<__half>(p, stream);
    case DType::kFloat32: return detail::launch_typed<float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tree_accept
}  // namespace specmoe
