// Argument validation of specmoe::kv_compact, shared by the CPU and CUDA implementations: runs before any
// write or kernel and names the argument. Shapes: csrc/kernels/kv_compact.h.
#pragma once

#include <ATen/ATen.h>

#include "../kernels/kv_compact.h"
#include "check.h"

namespace specmoe {

struct KvArgs {
  int64_t n, bs, Hk, S, d, P, elem;
};

inline KvArgs check_kv_compact_args(at::TensorList cache, const at::Tensor& lengths, const at::Tensor& path,
                                    const at::Tensor& n_accepted) {
  const char* op = "kv_compact";
  KvArgs a{};
  a.n = int64_t(cache.size());
  SPECMOE_CHECK(a.n >= 1 && a.n <= kv_compact::kMaxTensors, op, ": cache must hold 1 to ",
                int(kv_compact::kMaxTensors), " tensors (K and V of every layer), got ", a.n);
  const at::Tensor& c0 = cache[0];
  SPECMOE_CHECK(c0.dim() == 4, op, ": cache[0] must be 4-D [bs, Hk, S, d], got shape ", c0.sizes());
  a.bs = c0.size(0);
  a.Hk = c0.size(1);
  a.S = c0.size(2);
  a.d = c0.size(3);
  a.elem = int64_t(c0.element_size());
  for (int64_t t = 0; t < a.n; ++t) {
    const at::Tensor& c = cache[t];
    const std::string name = "cache[" + std::to_string(t) + "]";
    SPECMOE_CHECK(c.sizes() == c0.sizes(), op, ": ", name, " has shape ", c.sizes(), " but cache[0] has ",
                  c0.sizes());
    SPECMOE_CHECK(c.scalar_type() == c0.scalar_type(), op, ": ", name, " is ", c.scalar_type(),
                  " but cache[0] is ", c0.scalar_type());
    SPECMOE_CHECK(c.device() == c0.device(), op, ": ", name, " is on ", c.device(), " but cache[0] is on ",
                  c0.device());
    SPECMOE_CHECK(c.is_contiguous(), op, ": ", name, " must be contiguous");
  }
  SPECMOE_CHECK(a.Hk >= 1 && a.Hk <= 65535, op, ": Hk = cache[0].size(1) must be in [1, 65535], got ", a.Hk);
  SPECMOE_CHECK(a.bs <= 65535, op, ": at most 65535 requests, got bs = ", a.bs);
  SPECMOE_CHECK(a.d >= 1 && a.d * a.elem <= kv_compact::kStageBytes, op, ": a cache row (d = ", a.d,
                " elements) must be 1 to ", int(kv_compact::kStageBytes), " bytes");
  SPECMOE_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.size(0) == a.bs, op,
                ": lengths must be int64 [bs] with bs = ", a.bs, ", got ", lengths.scalar_type(), " ",
                lengths.sizes());
  SPECMOE_CHECK(path.scalar_type() == at::kLong && path.dim() == 2 && path.size(0) == a.bs && path.size(1) >= 1,
                op, ": path must be int64 [bs, P] with bs = ", a.bs, ", P >= 1, got ", path.scalar_type(), " ",
                path.sizes());
  a.P = path.size(1);
  SPECMOE_CHECK(n_accepted.scalar_type() == at::kLong && n_accepted.dim() == 1 && n_accepted.size(0) == a.bs,
                op, ": n_accepted must be int64 [bs] with bs = ", a.bs, ", got ", n_accepted.scalar_type(), " ",
                n_accepted.sizes());
  for (const auto& it : {std::make_pair("lengths", &lengths), std::make_pair("path", &path),
                         std::make_pair("n_accepted", &n_accepted)}) {
    SPECMOE_CHECK(it.second->is_contiguous(), op, ": ", it.first, " must be contiguous");
    check_same_device(op, it.first, *it.second, c0, "cache[0]");
  }
  return a;
}

}  // namespace specmoe
