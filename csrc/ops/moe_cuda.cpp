// CUDA adapter of specmoe::fused_moe: checks, outputs, scratch, stream, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "check.h"
#include "moe_common.h"
#include "cuda_device.h"

namespace specmoe {
namespace {

at::Tensor fused_moe_cuda(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                          const at::Tensor& weights, const at::Tensor& kept, const at::Tensor& counts,
                          const at::Tensor& offsets, const at::Tensor& pairs) {
  const MoeArgs a = check_moe_args(x, w13, w2, weights, kept, counts, offsets, pairs, true);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({a.T, a.h}, x.options());
  at::Tensor act = at::empty({a.T * a.K, a.f}, x.options());
  fused_moe::MoeParams p;
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  p.w13 = w13.data_ptr();
  p.w2 = w2.data_ptr();
  p.weights = weights.data_ptr<float>();
  p.kept_experts = kept.data_ptr<int32_t>();
  p.expert_counts = counts.data_ptr<int32_t>();
  p.expert_offsets = offsets.data_ptr<int32_t>();
  p.sorted_pairs = pairs.data_ptr<int32_t>();
  p.act = act.data_ptr();
  p.y = y.data_ptr();
  p.T = int(a.T);
  p.h = int(a.h);
  p.f = int(a.f);
  p.E = int(a.E);
  p.K = int(a.K);
  p.num_kept = int(a.num_kept);
  p.dtype = x.scalar_type() == at::kBFloat16 ? fused_moe::DType::kBFloat16 : fused_moe::DType::kFloat16;
  p.num_sms = multiprocessor_count(x.get_device());
  const cudaError_t err = fused_moe::launch_fused_moe(p, c10::cuda::getCurrentCUDAStream());
  SPECMOE_CHECK(err == cudaSuccess, "fused_moe: kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, CUDA, m) { m.impl("fused_moe", &fused_moe_cuda); }

}  // namespace specmoe
