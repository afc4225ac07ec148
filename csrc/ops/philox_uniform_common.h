// Argument validation of specmoe::philox_uniform, shared by the CPU, CUDA and Meta implementations: runs
// before any allocation or kernel and names the argument. Templates on the size type I (check.h).
// Contract: csrc/kernels/philox_uniform.h.
#pragma once

#include <ATen/ATen.h>

#include "../kernels/philox_uniform.h"
#include "check.h"

namespace specmoe {

template <typename I = int64_t>
void check_philox_uniform_args(const at::Tensor& seed, const at::Tensor& offset, int64_t n, int64_t stream) {
  const char* op = "philox_uniform";
  for (const auto& it : {std::make_pair("seed", &seed), std::make_pair("offset", &offset)}) {
    SPECMOE_CHECK(it.second->scalar_type() == at::kLong && it.second->dim() == 1, op, ": ", it.first,
                  " must be int64 [bs], got ", it.second->scalar_type(), " ", sizes_of<I>(*it.second));
    SPECMOE_CHECK(it.second->is_contiguous(), op, ": ", it.first, " must be contiguous");
  }
  SPECMOE_CHECK(size_of<I>(offset, 0) == size_of<I>(seed, 0), op, ": offset has ", size_of<I>(offset, 0),
                " entries but seed has ", size_of<I>(seed, 0));
  check_same_device(op, "offset", offset, seed, "seed");
  SPECMOE_CHECK(n >= 0 && n <= (int64_t(1) << 31), op, ": n must be in [0, 2^31], got ", n);
  SPECMOE_CHECK(stream >= 1 && stream <= 0xFFFFFFFFLL, op,
                ": stream must be in [1, 2^32) (stream 0 is tree_accept's node draws), got ", stream);
}

}  // namespace specmoe
