// Fused MoE expert FFN over the experts a routing kept: torch-free host interface.
//
// Shapes (legend): T tokens, h hidden, f expert FFN, E experts, K experts per token, Bk kept experts,
// N = T * K (token, slot) pairs, P = valid pairs (= expert_offsets[Bk]).
//
//   x               [T, h]      bf16 | fp16, row stride x_stride (elements)
//   w13             [E, 2f, h]  same dtype, contiguous; rows [0, f) = W1 (gate), [f, 2f) = W3 (up)
//   w2              [E, h, f]   same dtype, contiguous
//   weights         [T, K]      fp32 routing weights (0 for dropped slots)
//   kept_experts    [Bk]        int32   expert id of kept slot j
//   expert_counts   [Bk]        int32   pairs of kept slot j
//   expert_offsets  [Bk + 1]    int32   exclusive scan of counts
//   sorted_pairs    [N]         int32   flat pair ids t*K+k grouped by slot, ascending within a slot
// The kernels trust the grouping: kept experts distinct ids in [0, E), counts >= 0 with offsets their
// exclusive scan (<= N), each slot's pairs strictly ascending in [0, N), no pair in two slots, and every pair
// with a nonzero weight in one (the tiled combine reads the rows of exactly those). fused_moe_common.h
// check_grouping states it on host data (CPU always; CUDA under SPECMOE_CHECK_ROUTING=1).
//   act (scratch)   [N, f]      same dtype: silu(W1 x) * (W3 x) of pair at sorted position p
//   pair_out        [N, h]      fp32 scratch of the tiled path (row = pair t*K+k); unused by stream
//   y (out)         [T, h]      same dtype, contiguous
// Optional shared expert (Qwen2-MoE), fs its FFN size:
//   shared.w13 [2fs, h], shared.w2 [h, fs] (x's dtype), shared.weight [T] fp32 (e.g. the sigmoid gate),
//   shared.act [T, fs] and shared.out [T, h] fp32 scratch.
//
//   y[t] = sum_k weights[t, k] * W2[e] (silu(W1[e] x[t]) * W3[e] x[t])       e = the slot's expert
//        + shared.weight[t] * W2s (silu(W1s x[t]) * W3s x[t])               when a shared expert is given
//
// Only kept experts with at least one pair are read, each exactly once per launch in the small-T
// regime: the bytes moved follow the experts loaded (<= Bk), never the experts the tokens touched.
//
// Two paths, picked per call on the host from T * K and f, known without reading the routing
// (resolve_path):
//  stream (a few pairs on small experts: Qwen3-30B-A3B-like decode), two launches, both tensor-core
//   GEMMs with the weights as the M operand (mma.sync m16n8k16, tokens as N = 8 columns; "swapped" so
//   one token still uses full MMA rows).
//   1. gate_up: persistent CTAs over (active expert, 16-row tile of f). Each thread streams 16-byte
//      weight vectors straight into MMA fragments (the k order inside a 32-wide chunk is permuted the
//      same way for weights and activations, so no shared-memory staging is needed), with a
//      software pipeline several chunks deep. The 4 warps split h; their partial sums are reduced in
//      shared memory in a fixed order, then SiLU(gate) * up is written to `act`.
//   2. down + combine: CTAs over (16-row tile of h, tile of 64 tokens). A CTA walks every active
//      expert's pairs inside its token tile (binary search in the sorted pair list), multiplies
//      W2[e] rows by those pairs' activations, and adds weight * result into per-warp float32
//      accumulators in shared memory; the warps' accumulators are summed in a fixed order and
//      written to y. Every token's K contributions meet in one CTA: no atomics, deterministic.
//   Each loaded expert is streamed once per 16 of its pairs, so this path is for small T.
//  tiled (everything else: large experts, trees, prefill, tight budgets), three launches: gate_up and
//   down as tiled grouped GEMMs (pairs as M in tiles of 64, weights through a cp.async ring in shared
//   memory, each weight tile read once per 64 pairs), the down GEMM writing each pair's float32 row
//   to `pair_out`, then a combine summing the K rows of each token in slot order (deterministic).
// A shared expert runs as one more pair of tiled GEMMs (every token, in order) and is added in the
// combine, in float32 with the routed rows: a call with a shared expert takes the tiled path.
// No host synchronization on either path: expert lists stay on the device; capturable in a CUDA graph.
#pragma once

#include <cstddef>
#include <cstdint>

namespace specmoe {
namespace fused_moe {

enum class DType : int { kBFloat16 = 1, kFloat16 = 2 };

constexpr int kRowTile = 16;     // output rows per MMA tile (f rows in gate_up, h rows in down)
constexpr int kChunk = 32;       // k elements one thread-quad covers per 16-byte load
constexpr int kTokenTile = 64;   // tokens per down/combine CTA
constexpr int kMaxExperts = 512;
// The stream path runs for at most kStreamMaxPairs (token, slot) pairs on experts with f below
// kStreamMaxFfn; the tiled path everywhere else. On the H100 (bench_moe.py, both paths forced on 126
// cells) this rule is within 4% of the faster path everywhere: the tiled path's 64-row weight tiles
// leave SMs idle only when few small experts are loaded (Qwen3-30B-A3B decode).
constexpr int kStreamMaxPairs = 32;
constexpr int kStreamMaxFfn = 1024;

enum class Path : int { kAuto = 0, kStream = 1, kTiled = 2 };

struct SharedExpertParams {
  const void* w13 = nullptr;      // nullptr: no shared expert
  const void* w2 = nullptr;
  const float* weight = nullptr;
  void* act = nullptr;
  float* out = nullptr;
  int fs = 0;
};

struct MoeParams {
  const void* x = nullptr;
  int64_t x_stride = 0;
  const void* w13 = nullptr;
  const void* w2 = nullptr;
  const float* weights = nullptr;
  const int32_t* kept_experts = nullptr;
  const int32_t* expert_counts = nullptr;
  const int32_t* expert_offsets = nullptr;
  const int32_t* sorted_pairs = nullptr;
  void* act = nullptr;
  float* pair_out = nullptr;  // tiled path only
  void* y = nullptr;
  int T = 0, h = 0, f = 0, E = 0, K = 0, num_kept = 0;
  DType dtype = DType::kBFloat16;
  int num_sms = 132;  // persistent grid size
  Path path = Path::kAuto;
  SharedExpertParams shared;
};

// The path a launch takes (kAuto resolved by the average pairs per kept expert).
inline Path resolve_path(const MoeParams& p) {
  if (p.shared.w13 != nullptr) return Path::kTiled;  // the combine adds the shared expert
  if (p.path != Path::kAuto) return p.path;
  return static_cast<int64_t>(p.T) * p.K <= kStreamMaxPairs && p.f < kStreamMaxFfn ? Path::kStream : Path::kTiled;
}

}  // namespace fused_moe
}  // namespace specmoe

#if defined(__CUDACC__) || defined(SPECMOE_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace specmoe {
namespace fused_moe {

// Enqueues both launches on `stream`. h, f must be multiples of 64; arguments validated by the caller.
cudaError_t launch_fused_moe(const MoeParams& p, cudaStream_t stream);

}  // namespace fused_moe
}  // namespace specmoe
#endif
