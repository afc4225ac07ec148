// CUDA adapter of specmoe::tree_accept: checks, outputs, scratch, stream, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdlib>
#include <tuple>

#include "tree_accept_common.h"
#include "cuda_device.h"

namespace specmoe {
namespace {

// SPECMOE_ACCEPT_CLUSTER=1|2|4|8 forces the CTAs per tree node (tests, tuning); unset = automatic.
int forced_cluster() {
  const char* v = std::getenv("SPECMOE_ACCEPT_CLUSTER");
  return v ? std::atoi(v) : 0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_accept_cuda(
    const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& parent, const at::Tensor& valid,
    double temperature, double top_p, int64_t top_k, const at::Tensor& seed, const at::Tensor& offset) {
  const AcceptArgs a = check_tree_accept_args(logits, tokens, parent, valid, temperature, top_p, top_k, seed,
                                              offset);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto i64 = tokens.options();
  at::Tensor path = at::empty({a.bs, a.T}, i64);
  at::Tensor nacc = at::empty({a.bs}, i64);
  at::Tensor bonus = at::empty({a.bs}, i64);
  if (a.bs == 0) return {path, nacc, bonus};
  at::Tensor node_token = at::empty({a.bs, a.T}, i64.dtype(at::kInt));
  tree_accept::TreeAcceptParams p;
  p.logits = logits.data_ptr();
  const auto st = logits.scalar_type();
  p.dtype = st == at::kBFloat16 ? tree_accept::DType::kBFloat16
                                : (st == at::kHalf ? tree_accept::DType::kFloat16 : tree_accept::DType::kFloat32);
  p.vec_loads = (a.V * int64_t(logits.element_size())) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0;
  p.bs = int(a.bs);
  p.T = int(a.T);
  p.V = int(a.V);
  p.tokens = tokens.data_ptr<int64_t>();
  p.parent = parent.data_ptr<int64_t>();
  p.valid = valid.data_ptr<bool>();
  p.seed = seed.data_ptr<int64_t>();
  p.offset = offset.data_ptr<int64_t>();
  p.greedy = temperature == 0.0;
  p.scale = p.greedy ? 1.0f : float(tree_accept::kLog2e / temperature);
  p.top_p = top_p;
  p.top_k = int(top_k > a.V ? a.V : top_k);
  p.node_token = node_token.data_ptr<int32_t>();
  p.path = path.data_ptr<int64_t>();
  p.n_accepted = nacc.data_ptr<int64_t>();
  p.bonus = bonus.data_ptr<int64_t>();
  p.num_sms = multiprocessor_count(logits.get_device());
  p.cluster = forced_cluster();
  const cudaError_t err = tree_accept::launch_tree_accept(p, c10::cuda::getCurrentCUDAStream());
  SPECMOE_CHECK(err == cudaSuccess, "tree_accept: kernel launch failed: ", cudaGetErrorString(err));
  return {path, nacc, bonus};
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, CUDA, m) {
  m.impl("tree_accept", &tree_accept_cuda);
}

}  // namespace specmoe
