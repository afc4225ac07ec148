// Instantiates the routing kernels (dtype x experts-per-lane) behind the torch-free launcher.
#include "routing.cuh"

namespace specmoe {
namespace routing {

size_t route_workspace_bytes(int T, int E, int K) {
  return T <= kFusedMaxTokens ? 0 : detail::workspace_bytes(T, E, K);
}

template <typename Tin>
static cudaError_t dispatch_epl(const RouteParams& p, cudaStream_t stream) {
  // Experts per lane, rounded up to a power of two so the register arrays stay small for small E.
  if (p.E <= 32) return detail::launch_route_typed<Tin, 1>(p, stream);
  if (p.E <= 64) return detail::launch_route_typed<Tin, 2>(p, stream);
  if (p.E <= 128) return detail::launch_route_typed<Tin, 4>(p, stream);
  if (p.E <= 256) return detail::launch_route_typed<Tin, 8>(p, stream);
  return detail::launch_route_typed<Tin, 16>(p, stream);
}

cudaError_t launch_route(const RouteParams& p, cudaStream_t stream) {
  if (p.T < 0 || p.E < 1 || p.E > kMaxExperts || p.K < 1 || p.K > kMaxTopK || p.K > p.E ||
      p.num_kept < p.K || p.num_kept > p.E || p.n_group < 1 || p.n_group > kMaxGroups || p.E % p.n_group ||
      p.topk_group < 1 || p.topk_group > p.n_group || p.topk_group * (p.E / p.n_group) < p.K ||
      (p.n_group > 1 && p.group_scoring == GroupScoring::kTop2Sum && p.E / p.n_group < 2))
    return cudaErrorInvalidValue;
  switch (p.logits_dtype) {
    case DType::kFloat32: return dispatch_epl<float>(p, stream);
    case DType::kBFloat16: return dispatch_epl<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return dispatch_epl<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace routing
}  // namespace specmoe
