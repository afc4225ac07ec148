// KV compaction of accepted tree paths: torch-free host interface.
//
// Shapes (legend): bs requests, Hk kv heads, S cache capacity, d head dim, P path columns (= T),
// N cache tensors (K of every layer, then V of every layer: N = 2L, all of one shape and dtype).
//
//   cache[t]     [bs, Hk, S, d]  any dtype (moved as bytes), contiguous, N <= kMaxTensors
//   lengths      [bs]   int64    committed prefix length before the step; += n + 1 by the call
//   path         [bs, P] int64   accepted nodes from the root (path[b, 0] = 0), -1 padded
//   n_accepted   [bs]   int64    accepted draft tokens n_b (path[b, 1..n_b] are valid)
//
// For every request and tensor: slot lengths[b] + path[b, j] moves to slot lengths[b] + j for
// j = 1..n_b (the root is already in place), then lengths[b] += n_b + 1. Same as spec/kv.py kv_compact.
//
// Algorithm: launch 1, one CTA per (request, tensor) moves the n x Hk rows (head-major, j ascending)
// in stages of up to kStageBytes: all rows of a stage are read into shared memory before any is
// written. Safe because a root path in topological order has path[j] >= j: a stage's destinations lie
// below every later source, and no source lies below its destination. Launch 2 updates lengths (after
// every CTA of launch 1 read them).
// Device-side robustness (the host cannot see the values without a sync): n is clamped to [0, P-1];
// moves with path[j] < 1 or a slot outside [0, S) are skipped; the new length is capped at S; a node
// repeated in a path is a plain copy (every stage reads its sources before writing, and path[j] >= j keeps
// later sources above earlier destinations). The CPU op refuses all of these (kv_compact_common.h).
// Tensor pointers travel by value in the params struct: nothing is copied host -> device per call.
#pragma once

#include <cstdint>

namespace specmoe {
namespace kv_compact {

constexpr int kMaxTensors = 256;       // 2 x 128 layers
constexpr int kStageBytes = 32 * 1024;  // shared-memory staging per CTA

struct KvCompactParams {
  void* tensors[kMaxTensors] = {};
  int num_tensors = 0;
  int bs = 0, Hk = 0, P = 0;
  int64_t S = 0;
  int row_bytes = 0;                   // d * element size, <= kStageBytes
  int vec_bytes = 16;                  // 16, 8, 4, 2 or 1: divides row_bytes and every base address
  int64_t* lengths = nullptr;
  const int64_t* path = nullptr;
  const int64_t* n_accepted = nullptr;
};

}  // namespace kv_compact
}  // namespace specmoe

#if defined(__CUDACC__) || defined(SPECMOE_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace specmoe {
namespace kv_compact {

cudaError_t launch_kv_compact(const KvCompactParams& p, cudaStream_t stream);

}  // namespace kv_compact
}  // namespace specmoe
#endif
