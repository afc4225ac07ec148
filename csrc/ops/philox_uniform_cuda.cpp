// CUDA adapter of specmoe::philox_uniform: checks, output, stream, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "philox_uniform_common.h"

namespace specmoe {
namespace {

at::Tensor philox_uniform_cuda(const at::Tensor& seed, const at::Tensor& offset, int64_t n, int64_t stream) {
  check_philox_uniform_args(seed, offset, n, stream);
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor out = at::empty({seed.size(0), n}, seed.options().dtype(at::kFloat));
  philox::UniformParams p;
  p.seed = seed.data_ptr<int64_t>();
  p.offset = offset.data_ptr<int64_t>();
  p.out = out.data_ptr<float>();
  p.bs = seed.size(0);
  p.n = n;
  p.stream = uint32_t(stream);
  const cudaError_t err = philox::launch_uniform(p, c10::cuda::getCurrentCUDAStream());
  SPECMOE_CHECK(err == cudaSuccess, "philox_uniform: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, CUDA, m) { m.impl("philox_uniform", &philox_uniform_cuda); }

}  // namespace specmoe
