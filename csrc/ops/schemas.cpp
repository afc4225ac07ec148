// Every specmoe op is declared here, once. Implementations register per backend next to their code
// (routing_cpu.cpp, routing_cuda.cpp, ...). Shapes and semantics: python/specmoe_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "check.h"

namespace {

#ifndef SPECMOE_WITH_CUDA
// CPU-only build: a CUDA tensor reaching an op gets this instead of the dispatcher's generic
// "could not run ... with arguments from the 'CUDA' backend".
void cuda_kernels_missing(const c10::OperatorHandle& op, torch::jit::Stack*) {
  SPECMOE_CHECK(false, op.schema().name(),
              ": this specmoe_ext build has no CUDA kernels (it was built with a CPU-only torch or "
              "without nvcc). Rebuild on a machine with CUDA torch and nvcc: TORCH_CUDA_ARCH_LIST=9.0a "
              "pip install --no-build-isolation --no-deps -e .");
}
#endif

void def(torch::Library& m, const char* schema) {
  m.def(schema);
#ifndef SPECMOE_WITH_CUDA
  std::string name(schema);
  name = name.substr(0, name.find('('));
  m.impl(name.c_str(), torch::dispatch(c10::DispatchKey::CUDA,
                                       torch::CppFunction::makeFromBoxedFunction<&cuda_kernels_missing>()));
#endif
}

}  // namespace

TORCH_LIBRARY(specmoe, m) {
  def(m, "route_topk(Tensor logits, int top_k, str scoring='softmax', Tensor? bias=None, "
         "bool renormalize=True, int n_group=1, int topk_group=1, str group_scoring='top2', "
         "float scale=1.0) -> (Tensor weights, Tensor ids)");
  def(m, "route_budget(Tensor logits, int top_k, int budget, str scoring='softmax', Tensor? bias=None, "
         "bool renormalize=True, Tensor? token_weights=None, Tensor? protect=None, "
         "str policy='substitute', int n_group=1, int topk_group=1, str group_scoring='top2', "
         "float scale=1.0) -> (Tensor weights, Tensor ids, Tensor kept_experts, "
         "Tensor expert_counts, Tensor expert_offsets, Tensor sorted_pairs)");
  def(m, "fused_moe(Tensor x, Tensor w13, Tensor w2, Tensor weights, Tensor kept_experts, "
         "Tensor expert_counts, Tensor expert_offsets, Tensor sorted_pairs, Tensor? shared_w13=None, "
         "Tensor? shared_w2=None, Tensor? shared_weight=None) -> Tensor");
  def(m, "tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor prefix_lens, Tensor tree_mask, "
         "float scale, int kv_len_hint=0) -> Tensor");
  def(m, "tree_accept(Tensor logits, Tensor tokens, Tensor parent, Tensor valid, float temperature, "
         "float top_p, int top_k, Tensor seed, Tensor(a!) offset) -> (Tensor path, Tensor n_accepted, "
         "Tensor bonus)");
  def(m, "kv_compact(Tensor(a!)[] cache, Tensor(b!) lengths, Tensor path, Tensor n_accepted) -> ()");
  def(m, "philox_uniform(Tensor seed, Tensor offset, int n, int stream) -> Tensor");
}

// `import specmoe_ext._C` loads this library (which registers the ops above); the module itself only
// says whether the CUDA kernels were compiled in. No pybind11: ops go through the dispatcher.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "specmoe_ext op library", -1,
                                   nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* mod = PyModule_Create(&def);
  if (mod == nullptr) return nullptr;
#ifdef SPECMOE_WITH_CUDA
  PyModule_AddIntConstant(mod, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(mod, "WITH_CUDA", 0);
#endif
  return mod;
}
