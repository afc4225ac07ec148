// Tree acceptance of a verified draft tree (greedy and target sampling): torch-free host interface
// plus the host/device arithmetic that the CPU implementation and the CUDA kernels share bit for bit.
//
// Shapes (legend): bs requests, T tree nodes (node 0 = root), V vocab.
//
//   logits      [bs, T, V]  bf16 | fp16 | fp32, contiguous: the target's logits at every node
//   tokens      [bs, T]     int64  token of each node
//   parent      [bs, T]     int64  parent node (-1 for the root), parent[i] < i
//   valid       [bs, T]     bool   false = padding (never accepted)
//   seed        [bs]        int64  Philox key of request b
//   offset      [bs]        int64  Philox counter of request b; += 1 by every call (graph replays draw anew)
//   node_token  [bs, T]     int32  scratch: y_i, the token drawn (or the argmax) at node i
//   path        [bs, T]     int64  out: accepted node indices from the root (path[b, 0] = 0), -1 padded
//   n_accepted  [bs]        int64  out: path length - 1 (accepted draft tokens)
//   bonus       [bs]        int64  out: the token emitted where the walk stopped
//
// Rules.
//   greedy (temperature 0): y_i = argmax of node i's logits (ties -> lowest index; NaN counts as -inf).
//     A node is accepted when it is valid, its token equals y of its parent and its parent is accepted
//     (the root always is); the deepest accepted node wins (ties -> lowest index) and its y is the bonus.
//     This is spec/accept.py accept_greedy (for trees without duplicate siblings it is also the walk
//     "move to the first valid child carrying y").
//   target sampling (temperature > 0): y_i ~ node i's processed distribution, drawn with node i's own
//     uniform; walk from the root: move to the first valid child (lowest index) whose token is y_cur, else
//     stop and emit y_cur. This is accept_target_sampling with p = the processed distribution.
//
// Processed distribution of one node (deterministic, identical on CPU and GPU, no sorting):
//   key(x)     monotone integer key of the logit in its own dtype (16 bits for bf16/fp16, 32 for fp32;
//              NaN -> -inf, -0 -> +0): equal keys = equal logits, order of keys = order of logits.
//   w(x)       fixed-point weight exp((x - max) / temperature) * 2^32, computed as 2^z with
//              z = (x - max) * float32(log2(e) / temperature), z = n + f, 2^f by a degree-8 polynomial in
//              round-to-nearest float32 mul/add (no FMA), truncated to an integer (0 below 2^-40).
//              Integer masses make every sum exact and order-independent.
//   top-k      (0 < top_k < V) keep x iff #{y : key(y) > key(x)} < top_k      (ties at the boundary kept)
//   top-p      (top_p < 1) among the top-k set with total mass Wk: keep x iff
//              (mass of kept y with key(y) > key(x)) < top_p * Wk   (double)  (ties at the boundary kept)
//              HF / process_logits differ only in ties: they keep a prefix of a sorted order.
//   draw       u = philox bits24 * 2^-24 of (seed_b; offset_b, node, 0); W = mass of the kept set;
//              t = floor(u * W) (exact integer); y = the first kept x in vocabulary order whose
//              cumulative mass exceeds t. W = 0 (no finite logit) -> y = argmax.
//
// Algorithm (CUDA): launch 1: a cluster of G CTAs (G in 1, 2, 4, 8; fewer nodes -> larger G) per
//   (request, node), each CTA on a 1/G slice of the vocabulary (invalid non-root nodes exit); the CTAs
//   combine their integer histograms and partial results through distributed shared memory, each in
//   the same fixed order, so all reach the same thresholds. Pass 0: argmax (max of packed
//   (key, ~index)); greedy stops here. Sampled: top-k threshold by radix select on counts (8-bit
//   digits, 2 passes for 16-bit keys, 4 for fp32), top-p threshold by radix select on the integer
//   masses of the top-k set (same digits; the first pass also yields Wk), one pass of
//   per-256-element segment masses, then the one CTA whose slice holds t rescans a single segment.
//   Histograms use warp-aggregated shared atomics on integers: deterministic.
//   Launch 2: one warp per request walks the tree in shared memory, writes path / n_accepted / bonus
//   and advances offset.
// No host synchronization, fixed-size outputs: capturable in a CUDA graph.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "philox.h"

namespace specmoe {
namespace tree_accept {

enum class DType : int { kBFloat16 = 1, kFloat16 = 2, kFloat32 = 3 };

constexpr int kMaxNodes = 1024;        // T limit (the walk keeps a request's tree in shared memory)
constexpr int kMaxVocab = 1 << 20;     // V limit (segment masses live in shared memory)
constexpr int kSegment = 256;          // vocabulary elements per warp step (32 lanes x 8)
constexpr int kFixedBits = 32;         // w(max) = 2^32
constexpr double kLog2e = 1.4426950408889634;

struct TreeAcceptParams {
  const void* logits = nullptr;
  DType dtype = DType::kBFloat16;
  bool vec_loads = false;              // every row 16-byte aligned (V * element size % 16 == 0)
  int bs = 0, T = 0, V = 0;
  const int64_t* tokens = nullptr;
  const int64_t* parent = nullptr;
  const bool* valid = nullptr;
  const int64_t* seed = nullptr;
  int64_t* offset = nullptr;
  bool greedy = true;
  float scale = 1.0f;                  // float32(log2(e) / temperature)
  double top_p = 1.0;
  int top_k = 0;
  int32_t* node_token = nullptr;
  int64_t* path = nullptr;
  int64_t* n_accepted = nullptr;
  int64_t* bonus = nullptr;
  int num_sms = 132;                   // picks the CTAs per node
  int cluster = 0;                     // CTAs per node (1, 2, 4, 8); 0 = automatic
};

// ---- arithmetic shared by host and device -------------------------------------------------------

SPECMOE_HD float bits_as_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

// Round-to-nearest float32 ops that no compiler contracts into an FMA.
SPECMOE_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
SPECMOE_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
SPECMOE_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// Monotone keys (see the top): the 16-bit ones are returned in the high half of a uint32.
SPECMOE_HD uint32_t key_f32(uint32_t b) {
  if ((b & 0x7fffffffu) > 0x7f800000u) b = 0xff800000u;  // NaN -> -inf
  if (b == 0x80000000u) b = 0u;                             // -0 -> +0
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
SPECMOE_HD uint32_t key_16(uint32_t b, uint32_t inf_bits) {  // inf_bits: 0x7f80 bf16, 0x7c00 fp16
  b &= 0xffffu;
  if ((b & 0x7fffu) > inf_bits) b = 0x8000u | inf_bits;
  if (b == 0x8000u) b = 0u;
  const uint32_t k = (b & 0x8000u) ? (~b & 0xffffu) : (b | 0x8000u);
  return k << 16;
}
SPECMOE_HD uint32_t key_bf16(uint16_t b) { return key_16(b, 0x7f80u); }
SPECMOE_HD uint32_t key_f16(uint16_t b) { return key_16(b, 0x7c00u); }

// 2^f on [0, 1): Taylor coefficients ln2^k / k! rounded to float32 (hex: exact in every language).
SPECMOE_HD float exp2_frac(float f) {
  float p = 0x1.62c022p-20f;
  p = add_rn(mul_rn(p, f), 0x1.ffcbfcp-17f);
  p = add_rn(mul_rn(p, f), 0x1.430912p-13f);
  p = add_rn(mul_rn(p, f), 0x1.5d87fep-10f);
  p = add_rn(mul_rn(p, f), 0x1.3b2ab6p-7f);
  p = add_rn(mul_rn(p, f), 0x1.c6b08ep-5f);
  p = add_rn(mul_rn(p, f), 0x1.ebfbe0p-3f);
  p = add_rn(mul_rn(p, f), 0x1.62e430p-1f);
  p = add_rn(mul_rn(p, f), 1.0f);
  return p;
}

// Fixed-point weight of logit x given the row maximum m (x <= m) and scale = float32(log2(e)/temp).
SPECMOE_HD uint64_t fixed_weight(float x, float m, float scale) {
  const float z = mul_rn(sub_rn(x, m), scale);
  if (!(z > -40.0f)) return 0;  // NaN (inf - inf), -inf, or below 2^-40 (weight < 1/256 -> 0)
  const float n = floorf(z);
  const float p = exp2_frac(sub_rn(z, n));  // z - floor(z) is exact
  const int e = int(n) + kFixedBits;        // [-8, 32]
  return uint64_t(mul_rn(p, bits_as_float(uint32_t(e + 127) << 23)));
}

// floor(bits24 * 2^-24 * W), exact for W < 2^64 / 2^24 * 2^24.
SPECMOE_HD uint64_t scaled_threshold(uint32_t bits24, uint64_t W) {
  return (W >> 24) * uint64_t(bits24) + (((W & 0xffffffull) * uint64_t(bits24)) >> 24);
}

}  // namespace tree_accept
}  // namespace specmoe

#if defined(__CUDACC__) || defined(SPECMOE_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace specmoe {
namespace tree_accept {

// Enqueues both launches on `stream`; arguments validated by the caller (bs, T, V in range).
cudaError_t launch_tree_accept(const TreeAcceptParams& p, cudaStream_t stream);

}  // namespace tree_accept
}  // namespace specmoe
#endif
