// Argument validation of specmoe::tree_accept, shared by the CPU, CUDA and Meta implementations: runs
// before any allocation or kernel and names the argument. Templates on the size type I (check.h).
// Shapes: csrc/kernels/tree_accept.h.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "../kernels/tree_accept.h"
#include "check.h"

namespace specmoe {

template <typename I>
struct AcceptArgsT {
  I bs, T, V;
};
using AcceptArgs = AcceptArgsT<int64_t>;

template <typename I = int64_t>
AcceptArgsT<I> check_tree_accept_args(const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& parent,
                                      const at::Tensor& valid, double temperature, double top_p, int64_t top_k,
                                      const at::Tensor& seed, const at::Tensor& offset) {
  const char* op = "tree_accept";
  SPECMOE_CHECK(logits.dim() == 3, op, ": logits must be 3-D [bs, T, V], got shape ", sizes_of<I>(logits));
  const auto st = logits.scalar_type();
  SPECMOE_CHECK(st == at::kBFloat16 || st == at::kHalf || st == at::kFloat, op,
                ": logits must be bfloat16, float16 or float32, got ", st);
  SPECMOE_CHECK(logits.is_contiguous(), op, ": logits must be contiguous, got strides ", strides_of<I>(logits));
  AcceptArgsT<I> a{size_of<I>(logits, 0), size_of<I>(logits, 1), size_of<I>(logits, 2)};
  SPECMOE_CHECK(a.T >= 1 && a.T <= tree_accept::kMaxNodes, op,
                ": the tree size T = logits.size(1) must be in [1, ", int(tree_accept::kMaxNodes), "], got ", a.T);
  SPECMOE_CHECK(a.V >= 1 && a.V <= tree_accept::kMaxVocab, op,
                ": the vocabulary V = logits.size(2) must be in [1, ", int(tree_accept::kMaxVocab), "], got ", a.V);
  SPECMOE_CHECK(a.bs <= 65535, op, ": at most 65535 requests, got bs = ", a.bs);
  const std::vector<I> bt{a.bs, a.T};
  const std::vector<I> b1{a.bs};
  struct Item {
    const char* name;
    const at::Tensor* t;
    at::ScalarType dtype;
    const std::vector<I>* shape;
  };
  const Item items[] = {{"tokens", &tokens, at::kLong, &bt}, {"parent", &parent, at::kLong, &bt},
                        {"valid", &valid, at::kBool, &bt}, {"seed", &seed, at::kLong, &b1},
                        {"offset", &offset, at::kLong, &b1}};
  for (const Item& it : items) {
    SPECMOE_CHECK(it.t->scalar_type() == it.dtype, op, ": ", it.name, " must be ", it.dtype, ", got ",
                  it.t->scalar_type());
    SPECMOE_CHECK(sizes_of<I>(*it.t) == c10::ArrayRef<I>(*it.shape), op, ": ", it.name, " must have shape ",
                  c10::ArrayRef<I>(*it.shape), ", got ", sizes_of<I>(*it.t));
    SPECMOE_CHECK(it.t->is_contiguous(), op, ": ", it.name, " must be contiguous");
    check_same_device(op, it.name, *it.t, logits, "logits");
  }
  SPECMOE_CHECK(std::isfinite(temperature) && temperature >= 0.0, op,
                ": temperature must be finite and >= 0 (0 = greedy), got ", std::to_string(temperature));
  SPECMOE_CHECK(top_p > 0.0 && top_p <= 1.0, op, ": top_p must be in (0, 1] (1 = off), got ",
                std::to_string(top_p));
  SPECMOE_CHECK(top_k >= 0, op, ": top_k must be >= 0 (0 = off), got ", top_k);
  return a;
}

}  // namespace specmoe
