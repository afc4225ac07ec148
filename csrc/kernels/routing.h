// Expert routing and MoE-Spec expert budget: torch-free host interface.
//
// Shapes (legend): T tokens, E experts (<= 512), K experts per token (<= 16), Bk kept experts
// (= min(budget, E)); N = T * K (token, slot) pairs, flat index p = t * K + k.
//
//   logits          [T, E]   fp32 | bf16 | fp16, row stride `logits_stride` (elements), unit col stride
//   bias            [E]      fp32, optional: added to the probabilities for selection only
//   token_weights   [T]      fp32, optional (default 1): MoE-Spec score weights
//   protect         [T]      bool, optional: these tokens' natural experts are kept first
//   n_group, topk_group, group_scoring, scale   scalars (grouped top-K, routed_scaling_factor)
//   weights (out)   [T, K]   fp32
//   ids (out)       [T, K]   int32, -1 where truncation dropped the slot
//   kept_experts    [Bk]     int32, ascending expert ids        (only when `group`)
//   expert_counts   [Bk]     int32                              (only when `group`)
//   expert_offsets  [Bk + 1] int32, exclusive scan of counts    (only when `group`)
//   sorted_pairs    [N]      int32, p grouped by kept expert, ascending p within one; -1 padded
//
// Semantics (python/specmoe_ext/reference.py is the executable statement):
//   P[t, :] = softmax(logits[t, :]) or sigmoid(logits[t, :]) in fp32 of the clean logits (clean_logit:
//   NaN counts as -inf, +inf as the largest finite float, so a row's +inf experts share probability 1).
//   selection key = logits (no bias; same order as P) or P + bias, a NaN key (NaN bias) counting as
//   -inf (clean_key). Top-K: best first, ties to the lower expert id.
//   Grouped top-K (n_group G > 1, DeepSeek-V2/V3 device-limited routing): experts form G contiguous groups
//   of E/G; a group's score is clean_group_score(sum of its best m values of g[e] = the selection key
//   P + bias (bias given), else P),
//   m = 2 (group_scoring kTop2Sum, V3 / GLM-4.5) or 1 (kMax, V2); a token keeps its topk_group best
//   groups (ties to the lower group index) and its natural top-K is taken among their experts only
//   (topk_group * E/G >= K). Budget (Bk < E): s[e] = sum_t
//   w_t P[t, e] with w_t = clean_token_weight(token_weights[t]) (NaN and negative weights count as 0,
//   +inf as the largest finite float, so scores are never NaN); keep the Bk best experts by
//   (protected, s, -e). Protected experts beyond the budget: the Bk best of them by (s, -e) are kept and
//   the protected tokens are then routed like the others. substitute = re-pick each token's top-K
//   among the kept experts (grouped: the kept experts of its own groups first, by key, then the other
//   kept experts by key; so a token whose natural experts were all kept keeps them), truncate = drop
//   natural slots whose expert is not kept. Weights are P at the chosen experts, divided by their sum
//   when `renormalize` (0 when the sum is 0), then multiplied by `scale` (routed_scaling_factor).
//
// Algorithm: a token is one warp (each lane holds E/32 logits in registers); top-K by K rounds of
// redux.sync max over order-preserving integer keys, then redux.sync min over ids for the tie.
// Grouped routing: per group, redux.sync max of the lanes' best (and, for top-2, the owner's second
// best) order keys gives the group score; lane g ranks group g against the others by shuffles and a
// ballot gives the token's 32-bit group mask (G <= 32), which makes the other groups' experts
// unavailable to the natural top-K and orders the substitution (stored per token for the budget pass).
// T <= kFusedMaxTokens: ONE block does everything (scores, budget selection, re-routing, grouping),
// synchronising with __syncthreads; grouping uses per-expert token bitmasks (a token uses an expert at
// most once, so a pair's rank in its expert is a popcount). Larger T: four launches (token pass,
// select, finalize, group) sharing the same device functions; grouping is a stable counting sort
// (match.any ranks within a warp, per-warp histograms scanned in (expert, warp) order). No atomics, no host synchronisation: the whole op
// is CUDA-graph capturable and bitwise deterministic.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "host_device.h"

namespace specmoe {
namespace routing {

// Value rules of non-finite inputs, shared by the CPU op and the kernels (reference.py: the same).
SPECMOE_HD float clean_logit(float x) { return x != x ? -INFINITY : (x > FLT_MAX ? FLT_MAX : x); }
SPECMOE_HD float clean_key(float k) { return k != k ? -INFINITY : k; }
SPECMOE_HD float clean_token_weight(float w) { return w > 0.f ? (w < FLT_MAX ? w : FLT_MAX) : 0.f; }
// Group score: the sum (top-2) or the max of a group's best values, a NaN sum (+inf + -inf) counting as -inf.
SPECMOE_HD float clean_group_score(float s) { return s != s ? -INFINITY : s; }

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum class Scoring : int { kSoftmax = 0, kSigmoid = 1 };
enum class Policy : int { kSubstitute = 0, kTruncate = 1 };
enum class GroupScoring : int { kTop2Sum = 0, kMax = 1 };

constexpr int kMaxExperts = 512;
constexpr int kMaxTopK = 16;
constexpr int kMaxGroups = 32;  // a token's groups fit one 32-bit mask
constexpr int kFusedMaxTokens = 128;  // one fused block up to here; four launches above

struct RouteParams {
  const void* logits = nullptr;
  int64_t logits_stride = 0;
  DType logits_dtype = DType::kFloat32;
  const float* bias = nullptr;
  const float* token_weights = nullptr;
  const bool* protect = nullptr;
  int T = 0, E = 0, K = 0;
  int num_kept = 0;  // Bk; == E means no budget
  Scoring scoring = Scoring::kSoftmax;
  Policy policy = Policy::kSubstitute;
  bool renormalize = true;
  bool group = true;  // write kept_experts / expert_counts / expert_offsets / sorted_pairs
  int n_group = 1;     // G expert groups (1 = no group restriction)
  int topk_group = 1;  // groups a token may use (1 <= topk_group <= G)
  GroupScoring group_scoring = GroupScoring::kTop2Sum;
  float scale = 1.f;   // routed_scaling_factor, applied to the final weights

  float* weights = nullptr;
  int32_t* ids = nullptr;
  int32_t* kept_experts = nullptr;
  int32_t* expert_counts = nullptr;
  int32_t* expert_offsets = nullptr;
  int32_t* sorted_pairs = nullptr;

  void* workspace = nullptr;  // route_workspace_bytes(T, E, K) bytes; unused when T <= kFusedMaxTokens
};

}  // namespace routing
}  // namespace specmoe

// The launcher needs the CUDA runtime's types; CPU-only builds use just the definitions above.
#if defined(__CUDACC__) || defined(SPECMOE_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace specmoe {
namespace routing {

// Device workspace the launcher needs (0 for the fused single-block path).
size_t route_workspace_bytes(int T, int E, int K);

// Enqueues the routing on `stream`. Arguments must have been validated by the caller; returns
// cudaErrorInvalidValue for out-of-range sizes and the launch error otherwise.
cudaError_t launch_route(const RouteParams& p, cudaStream_t stream);

}  // namespace routing
}  // namespace specmoe
#endif
