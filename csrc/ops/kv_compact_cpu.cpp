// CPU implementation of specmoe::kv_compact: every value checked before the first write (a bad call
// leaves the cache untouched), then per (tensor, request, head) the accepted rows are staged and written
// back (sources read first).
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "kv_compact_common.h"

namespace specmoe {
namespace {

void kv_compact_cpu(at::TensorList cache, const at::Tensor& lengths, const at::Tensor& path,
                    const at::Tensor& n_accepted) {
  const KvArgs a = check_kv_compact_args(cache, lengths, path, n_accepted);
  check_kv_compact_moves(a, lengths, path, n_accepted);  // every value before the first write
  const int64_t* len = lengths.data_ptr<int64_t>();
  const int64_t* pp = path.data_ptr<int64_t>();
  const int64_t* np = n_accepted.data_ptr<int64_t>();
  const int64_t rb = a.d * a.elem;
  std::vector<char> stage;
  for (int64_t t = 0; t < a.n; ++t) {
    char* base = static_cast<char*>(cache[size_t(t)].data_ptr());
    for (int64_t b = 0; b < a.bs; ++b) {
      const int64_t n = np[b], L = len[b];
      if (n == 0) continue;
      const int64_t* row = pp + b * a.P;
      stage.resize(size_t(n * rb));
      for (int64_t h = 0; h < a.Hk; ++h) {
        char* head = base + (b * a.Hk + h) * a.S * rb;
        char* st = stage.data();
        for (int64_t j = 1; j <= n; ++j) std::memcpy(st + (j - 1) * rb, head + (L + row[j]) * rb, size_t(rb));
        for (int64_t j = 1; j <= n; ++j) std::memcpy(head + (L + j) * rb, st + (j - 1) * rb, size_t(rb));
      }
    }
  }
  int64_t* lw = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < a.bs; ++b) lw[b] += np[b] + 1;
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, CPU, m) { m.impl("kv_compact", &kv_compact_cpu); }

}  // namespace specmoe
