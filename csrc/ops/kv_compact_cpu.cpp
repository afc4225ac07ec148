// CPU implementation of specmoe::kv_compact: every value checked before the first write, then per
// (tensor, request, head) the accepted rows are staged and written back (sources read first).
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "kv_compact_common.h"

namespace specmoe {
namespace {

void kv_compact_cpu(at::TensorList cache, const at::Tensor& lengths, const at::Tensor& path,
                    const at::Tensor& n_accepted) {
  const KvArgs a = check_kv_compact_args(cache, lengths, path, n_accepted);
  const char* op = "kv_compact";
  const int64_t* len = lengths.data_ptr<int64_t>();
  const int64_t* pp = path.data_ptr<int64_t>();
  const int64_t* np = n_accepted.data_ptr<int64_t>();
  // every value is checked before the first write: a bad call leaves the cache untouched
  for (int64_t b = 0; b < a.bs; ++b) {
    const int64_t n = np[b], L = len[b];
    const int64_t* row = pp + b * a.P;
    SPECMOE_CHECK(n >= 0 && n <= a.P - 1, op, ": request ", b, ": n_accepted = ", n, " is outside [0, ",
                  a.P - 1, "] (path has ", a.P, " columns)");
    SPECMOE_CHECK(row[0] == 0, op, ": request ", b, ": path[", b, ", 0] must be 0 (the root), got ", row[0]);
    SPECMOE_CHECK(L >= 0 && L + n + 1 <= a.S, op, ": request ", b, ": lengths = ", L, " plus ", n + 1,
                  " committed slots exceeds the cache capacity S = ", a.S);
    for (int64_t j = 1; j <= n; ++j)
      SPECMOE_CHECK(row[j] >= j && L + row[j] < a.S, op, ": request ", b, ": path[", b, ", ", j, "] = ",
                    row[j], " is not a tree node at depth ", j, " inside the cache (need ", j, " <= path < ",
                    a.S - L, ")");
  }
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
