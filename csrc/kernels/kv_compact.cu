// Instantiates the KV compaction kernels (vector widths 16..1 bytes) behind the torch-free launcher.
#include "kv_compact.cuh"

namespace specmoe {
namespace kv_compact {

cudaError_t launch_kv_compact(const KvCompactParams& p, cudaStream_t stream) {
  if (p.bs < 0 || p.bs > 65535 || p.Hk < 1 || p.Hk > 65535 || p.P < 1 || p.num_tensors < 0 ||
      p.num_tensors > kMaxTensors || p.row_bytes < 1 || p.row_bytes > kStageBytes ||
      p.row_bytes % p.vec_bytes != 0)
    return cudaErrorInvalidValue;
  if (p.bs == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  if (p.num_tensors > 0) {
    switch (p.vec_bytes) {
      case 16: err = detail::launch_vec<16>(p, stream); break;
      case 8: err = detail::launch_vec<8>(p, stream); break;
      case 4: err = detail::launch_vec<4>(p, stream); break;
      case 2: err = detail::launch_vec<2>(p, stream); break;
      case 1: err = detail::launch_vec<1>(p, stream); break;
      default: return cudaErrorInvalidValue;
    }
    if (err != cudaSuccess) return err;
  }
  detail::commit_kernel<<<unsigned((p.bs + 127) / 128), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kv_compact
}  // namespace specmoe
