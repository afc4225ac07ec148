// CUDA adapter of specmoe::kv_compact: checks, params (tensor pointers by value), stream, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>

#include "kv_compact_common.h"

namespace specmoe {
namespace {

void kv_compact_cuda(at::TensorList cache, const at::Tensor& lengths, const at::Tensor& path,
                     const at::Tensor& n_accepted) {
  const KvArgs a = check_kv_compact_args(cache, lengths, path, n_accepted);
  SPECMOE_CHECK(cache[0].is_cuda(), "kv_compact: cache must be CUDA tensors here, got ", cache[0].device());
  const c10::cuda::CUDAGuard guard(cache[0].device());
  kv_compact::KvCompactParams p;
  int64_t align = 16;
  const int64_t rb = a.d * a.elem;
  while (align > 1 && rb % align != 0) align /= 2;
  for (int64_t t = 0; t < a.n; ++t) {
    p.tensors[t] = cache[size_t(t)].data_ptr();
    while (align > 1 && reinterpret_cast<uintptr_t>(p.tensors[t]) % uintptr_t(align) != 0) align /= 2;
  }
  p.num_tensors = int(a.n);
  p.bs = int(a.bs);
  p.Hk = int(a.Hk);
  p.P = int(a.P);
  p.S = a.S;
  p.row_bytes = int(rb);
  p.vec_bytes = int(align);
  p.lengths = lengths.data_ptr<int64_t>();
  p.path = path.data_ptr<int64_t>();
  p.n_accepted = n_accepted.data_ptr<int64_t>();
  const cudaError_t err = kv_compact::launch_kv_compact(p, c10::cuda::getCurrentCUDAStream());
  SPECMOE_CHECK(err == cudaSuccess, "kv_compact: kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, CUDA, m) { m.impl("kv_compact", &kv_compact_cuda); }

}  // namespace specmoe
