// Argument validation of specmoe::kv_compact, shared by the CPU, CUDA and Meta implementations: runs before
// any write or kernel and names the argument. Shapes: csrc/kernels/kv_compact.h.
//   check_kv_compact_args   shapes, dtypes, devices, and that no two written tensors share memory
//                           (templates on the size type I: check.h; metadata only, every backend)
//   check_kv_compact_moves  the VALUES of lengths / path / n_accepted (host data, CPU): every move in
//                           the cache and from a distinct node. CUDA cannot see them without a sync: its
//                           kernel skips out-of-range moves instead (kv_compact.h)
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "../kernels/kv_compact.h"
#include "check.h"

namespace specmoe {

template <typename I>
struct KvArgsT {
  int64_t n;
  I bs, Hk, S, d, P;
  int64_t elem;
};
using KvArgs = KvArgsT<int64_t>;

template <typename I = int64_t>
KvArgsT<I> check_kv_compact_args(at::TensorList cache, const at::Tensor& lengths, const at::Tensor& path,
                                 const at::Tensor& n_accepted) {
  const char* op = "kv_compact";
  KvArgsT<I> a{int64_t(cache.size()), I(0), I(0), I(0), I(0), I(0), 0};
  SPECMOE_CHECK(a.n >= 1 && a.n <= kv_compact::kMaxTensors, op, ": cache must hold 1 to ",
                int(kv_compact::kMaxTensors), " tensors (K and V of every layer), got ", a.n);
  const at::Tensor& c0 = cache[0];
  SPECMOE_CHECK(c0.dim() == 4, op, ": cache[0] must be 4-D [bs, Hk, S, d], got shape ", sizes_of<I>(c0));
  a.bs = size_of<I>(c0, 0);
  a.Hk = size_of<I>(c0, 1);
  a.S = size_of<I>(c0, 2);
  a.d = size_of<I>(c0, 3);
  a.elem = int64_t(c0.element_size());
  std::vector<const at::Tensor*> written;  // every tensor the op writes: cache[0..n), then lengths
  written.reserve(size_t(a.n) + 1);
  for (int64_t t = 0; t < a.n; ++t) {  // messages name cache[t] (built only on failure)
    const at::Tensor& c = cache[size_t(t)];
    SPECMOE_CHECK(sizes_of<I>(c) == sizes_of<I>(c0), op, ": cache[", t, "] has shape ", sizes_of<I>(c),
                  " but cache[0] has ", sizes_of<I>(c0));
    SPECMOE_CHECK(c.scalar_type() == c0.scalar_type(), op, ": cache[", t, "] is ", c.scalar_type(),
                  " but cache[0] is ", c0.scalar_type());
    SPECMOE_CHECK(c.device() == c0.device(), op, ": cache[", t, "] is on ", c.device(), " but cache[0] is on ",
                  c0.device());
    SPECMOE_CHECK(c.is_contiguous(), op, ": cache[", t, "] must be contiguous");
    written.push_back(&c);
  }
  SPECMOE_CHECK(a.Hk >= 1 && a.Hk <= 65535, op, ": Hk = cache[0].size(1) must be in [1, 65535], got ", a.Hk);
  SPECMOE_CHECK(a.bs <= 65535, op, ": at most 65535 requests, got bs = ", a.bs);
  SPECMOE_CHECK(a.d >= 1 && a.d * a.elem <= kv_compact::kStageBytes, op, ": a cache row (d = ", a.d,
                " elements) must be 1 to ", int(kv_compact::kStageBytes), " bytes");
  SPECMOE_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && size_of<I>(lengths, 0) == a.bs, op,
                ": lengths must be int64 [bs] with bs = ", a.bs, ", got ", lengths.scalar_type(), " ",
                sizes_of<I>(lengths));
  SPECMOE_CHECK(path.scalar_type() == at::kLong && path.dim() == 2 && size_of<I>(path, 0) == a.bs &&
                    size_of<I>(path, 1) >= 1,
                op, ": path must be int64 [bs, P] with bs = ", a.bs, ", P >= 1, got ", path.scalar_type(), " ",
                sizes_of<I>(path));
  a.P = size_of<I>(path, 1);
  SPECMOE_CHECK(n_accepted.scalar_type() == at::kLong && n_accepted.dim() == 1 && size_of<I>(n_accepted, 0) == a.bs,
                op, ": n_accepted must be int64 [bs] with bs = ", a.bs, ", got ", n_accepted.scalar_type(), " ",
                sizes_of<I>(n_accepted));
  for (const auto& it : {std::make_pair("lengths", &lengths), std::make_pair("path", &path),
                         std::make_pair("n_accepted", &n_accepted)}) {
    SPECMOE_CHECK(it.second->is_contiguous(), op, ": ", it.first, " must be contiguous");
    check_same_device(op, it.first, *it.second, c0, "cache[0]");
  }
  // A tensor listed twice would be compacted twice; a path / n_accepted sharing lengths' memory would
  // change under the op's own update of lengths.
  written.push_back(&lengths);
  check_disjoint<I>(op, written, [&](size_t i) {
    return i < size_t(a.n) ? "cache[" + std::to_string(i) + "]" : std::string("lengths");
  });
  for (const auto& it : {std::make_pair("path", &path), std::make_pair("n_accepted", &n_accepted)})
    check_disjoint<I>(op, {&lengths, it.second}, [&](size_t i) { return std::string(i ? it.first : "lengths"); });
  return a;
}

// Host values: 0 <= n_b <= P - 1, path[b, 0] = 0 (the root), lengths_b + n_b + 1 <= S, and for
// j = 1..n_b a tree node path[b, j] >= j inside the cache; the nodes that move (path[b, j] != j) are
// distinct (an accepted path visits a node once; path[b, j] == j is a slot already in place).
inline void check_kv_compact_moves(const KvArgs& a, const at::Tensor& lengths, const at::Tensor& path,
                                   const at::Tensor& n_accepted) {
  const char* op = "kv_compact";
  const int64_t* len = lengths.data_ptr<int64_t>();
  const int64_t* pp = path.data_ptr<int64_t>();
  const int64_t* np = n_accepted.data_ptr<int64_t>();
  std::vector<int64_t> moving;
  for (int64_t b = 0; b < a.bs; ++b) {
    const int64_t n = np[b], L = len[b];
    const int64_t* row = pp + b * a.P;
    SPECMOE_CHECK(n >= 0 && n <= a.P - 1, op, ": request ", b, ": n_accepted = ", n, " is outside [0, ",
                  a.P - 1, "] (path has ", a.P, " columns)");
    SPECMOE_CHECK(row[0] == 0, op, ": request ", b, ": path[", b, ", 0] must be 0 (the root), got ", row[0]);
    SPECMOE_CHECK(L >= 0 && L + n + 1 <= a.S, op, ": request ", b, ": lengths = ", L, " plus ", n + 1,
                  " committed slots exceeds the cache capacity S = ", a.S);
    moving.clear();
    for (int64_t j = 1; j <= n; ++j) {
      SPECMOE_CHECK(row[j] >= j && L + row[j] < a.S, op, ": request ", b, ": path[", b, ", ", j, "] = ",
                    row[j], " is not a tree node at depth ", j, " inside the cache (need ", j, " <= path < ",
                    a.S - L, ")");
      if (row[j] != j) moving.push_back(row[j]);
    }
    std::sort(moving.begin(), moving.end());
    const auto twice = std::adjacent_find(moving.begin(), moving.end());
    SPECMOE_CHECK(twice == moving.end(), op, ": request ", b, ": node ", twice == moving.end() ? 0 : *twice,
                  " appears twice in path[", b, ", 1:", n + 1, "] (an accepted path visits a node once)");
  }
}

}  // namespace specmoe
