// Meta (fake) kernel of specmoe::kv_compact: the CPU/CUDA argument checks (kv_compact_common.h, with
// symbolic sizes; aliasing between written tensors included) and nothing else: the op writes its inputs
// in place and returns nothing. The path values are data, which a meta tensor has none of.
#include <torch/library.h>

#include "kv_compact_common.h"

namespace specmoe {
namespace {

void kv_compact_meta(at::TensorList cache, const at::Tensor& lengths, const at::Tensor& path,
                     const at::Tensor& n_accepted) {
  check_kv_compact_args<c10::SymInt>(cache, lengths, path, n_accepted);
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, Meta, m) { m.impl("kv_compact", &kv_compact_meta); }

}  // namespace specmoe
