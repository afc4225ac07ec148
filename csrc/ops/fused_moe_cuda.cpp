// CUDA adapter of specmoe::fused_moe: checks, outputs, scratch, stream, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>
#include <torch/library.h>

#include "check.h"
#include "fused_moe_common.h"
#include "cuda_device.h"

namespace specmoe {
namespace {

// SPECMOE_FUSED_MOE_PATH = stream | tiled forces a path (tests, benchmarks); unset or auto = by size.
fused_moe::Path path_from_env() {
  const char* v = std::getenv("SPECMOE_FUSED_MOE_PATH");
  if (v == nullptr || *v == 0 || std::strcmp(v, "auto") == 0) return fused_moe::Path::kAuto;
  if (std::strcmp(v, "stream") == 0) return fused_moe::Path::kStream;
  if (std::strcmp(v, "tiled") == 0) return fused_moe::Path::kTiled;
  SPECMOE_CHECK(false, "fused_moe: SPECMOE_FUSED_MOE_PATH must be auto, stream or tiled, got '", v, "'");
  return fused_moe::Path::kAuto;
}

// SPECMOE_CHECK_ROUTING=1 (debugging): the grouping's values are validated as on the CPU (check_grouping)
// before the launch. That copies them to the host, a synchronization, so it is refused during CUDA graph
// capture. Unset (the default): the kernels trust the grouping, no extra work.
bool routing_check_requested() {
  const char* v = std::getenv("SPECMOE_CHECK_ROUTING");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

void check_grouping_on_host(const MoeArgs& a, const at::Tensor& weights, const at::Tensor& kept,
                            const at::Tensor& counts, const at::Tensor& offsets, const at::Tensor& pairs) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &capture);
  SPECMOE_CHECK(err == cudaSuccess && capture == cudaStreamCaptureStatusNone,
                "fused_moe: SPECMOE_CHECK_ROUTING=1 reads the routing on the host, which a CUDA graph capture "
                "cannot do; unset it while capturing");
  check_grouping(a, weights.cpu(), kept.cpu(), counts.cpu(), offsets.cpu(), pairs.cpu());
}

at::Tensor fused_moe_cuda(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                          const at::Tensor& weights, const at::Tensor& kept, const at::Tensor& counts,
                          const at::Tensor& offsets, const at::Tensor& pairs,
                          const c10::optional<at::Tensor>& shared_w13, const c10::optional<at::Tensor>& shared_w2,
                          const c10::optional<at::Tensor>& shared_weight) {
  const MoeArgs a = check_moe_args(x, w13, w2, weights, kept, counts, offsets, pairs, true);
  const int64_t fs = check_shared_expert(x, shared_w13, shared_w2, shared_weight);
  const c10::cuda::CUDAGuard guard(x.device());
  if (routing_check_requested()) check_grouping_on_host(a, weights, kept, counts, offsets, pairs);
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
  p.path = path_from_env();
  at::Tensor shared_act, shared_out;
  if (fs > 0) {
    shared_act = at::empty({a.T, fs}, x.options());
    shared_out = at::empty({a.T, a.h}, x.options().dtype(at::kFloat));
    p.shared.w13 = shared_w13->data_ptr();
    p.shared.w2 = shared_w2->data_ptr();
    p.shared.weight = shared_weight->data_ptr<float>();
    p.shared.act = shared_act.data_ptr();
    p.shared.out = shared_out.data_ptr<float>();
    p.shared.fs = int(fs);
  }
  at::Tensor pair_out;
  if (fused_moe::resolve_path(p) == fused_moe::Path::kTiled) {
    pair_out = at::empty({a.T * a.K, a.h}, x.options().dtype(at::kFloat));
    p.pair_out = pair_out.data_ptr<float>();
  }
  const cudaError_t err = fused_moe::launch_fused_moe(p, c10::cuda::getCurrentCUDAStream());
  SPECMOE_CHECK(err == cudaSuccess, "fused_moe: kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, CUDA, m) { m.impl("fused_moe", &fused_moe_cuda); }

}  // namespace specmoe
