// Expert routing + MoE-Spec budget kernels. Contract, shapes and algorithm: routing.h.
//
// The op is latency-bound (a few KB of logits), so the kernels are organised around dependent
// round trips, not bandwidth: each row is read from global memory once (kept in shared memory or
// prefetched one token ahead), the weight of a chosen expert travels by shuffle instead of a reload,
// expert ranking compares packed 64-bit keys, and positions come from ballots and prefix scans.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "routing.h"

// SPECMOE_ROUTE_PHASES (bench/routing_phases.cu only): thread 0 of the fused kernel records clock64()
// at each phase boundary, to see where the latency goes.
#ifdef SPECMOE_ROUTE_PHASES
__device__ long long g_route_phase_clock[16];
#define ROUTE_PHASE(i) do { if (threadIdx.x == 0) g_route_phase_clock[i] = clock64(); } while (0)
#else
#define ROUTE_PHASE(i) do { } while (0)
#endif

namespace specmoe {
namespace routing {
namespace detail {

using device::kFull;
using device::to_float;
using device::block_exclusive_scan;
constexpr uint32_t kUnavailable = 0u;    // below every order_key(), including order_key(-inf)
constexpr int kStashMaxFloats = 24 * 1024;  // fused path keeps the cleaned logits in smem below this
constexpr int kTokenBlockThreads = 256;  // multi-block path: token pass / finalize
constexpr int kTokensPerBlock = 32;
constexpr int kSelectThreads = 512;      // >= kMaxExperts: one thread per expert
constexpr int kGroupThreads = 1024;      // multi-block path: grouping
static_assert(kSelectThreads >= kMaxExperts, "selection needs a thread per expert");

// Monotone map float -> uint32 (for non-NaN inputs): a < b  <=>  order_key(a) < order_key(b), and
// -0 == +0 like the float comparison (so ties between them go to the lower id, as everywhere else).
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = f == 0.f ? 0u : __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inverse of order_key for the keys of non-NaN floats (-0 comes back as +0).
__device__ __forceinline__ float from_order_key(uint32_t u) {
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

// P for one (clean) logit given the row's softmax stats (m: max, or 0 with no finite logit;
// inv = 1 / sum of exp(x - m), or 0 when that sum is 0). One reciprocal per row, not a divide per
// element: the CPU implementation computes the same expression.
__device__ __forceinline__ float prob_of(float x, Scoring scoring, float m, float inv) {
  if (scoring == Scoring::kSigmoid) return 1.f / (1.f + expf(-x));
  return expf(x - m) * inv;
}

template <typename Tin, int EPL>
struct RawRow {
  Tin v[EPL];
};

template <typename Tin, int EPL>
__device__ __forceinline__ void load_raw(const RouteParams& p, int t, int lane, RawRow<Tin, EPL>& r) {
  const Tin* row = static_cast<const Tin*>(p.logits) + static_cast<int64_t>(t) * p.logits_stride;
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = lane + 32 * i;
    r.v[i] = e < p.E ? row[e] : device::from_float<Tin>(0.f);
  }
}

template <typename Tin, int EPL>
__device__ __forceinline__ void clean_row(const RouteParams& p, int lane, const RawRow<Tin, EPL>& r,
                                          float (&x)[EPL]) {
#pragma unroll
  for (int i = 0; i < EPL; ++i)
    x[i] = lane + 32 * i < p.E ? clean_logit(to_float(r.v[i])) : -INFINITY;
}

// Row probabilities P[i] of expert lane + 32 i, and the stats prob_of needs (m, inv).
template <int EPL>
__device__ __forceinline__ void row_probs(const RouteParams& p, const float (&x)[EPL], float (&P)[EPL],
                                          float& m, float& inv) {
  m = 0.f;
  inv = 0.f;
  if (p.scoring != Scoring::kSoftmax) {
#pragma unroll
    for (int i = 0; i < EPL; ++i) P[i] = prob_of(x[i], p.scoring, 0.f, 0.f);
    return;
  }
  float lm = -INFINITY;
#pragma unroll
  for (int i = 0; i < EPL; ++i) lm = fmaxf(lm, x[i]);
  m = device::warp_max(lm);
  if (m == -INFINITY) m = 0.f;
  float ls = 0.f;
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    P[i] = expf(x[i] - m);
    ls += P[i];
  }
  const float s = device::warp_sum(ls);
  inv = s > 0.f ? 1.f / s : 0.f;
#pragma unroll
  for (int i = 0; i < EPL; ++i) P[i] *= inv;
}

// Group of expert e (groups of E / n_group contiguous experts; 0 without grouping).
__device__ __forceinline__ int group_of(const RouteParams& p, int e) {
  return p.n_group > 1 ? e / (p.E / p.n_group) : 0;
}

// The token's group mask (routing.h): bit g set for its topk_group best groups; 1 (group 0) without
// grouping. Group g's score: the best (kMax) or best + second best (kTop2Sum) value of g[e] = P + bias
// (bias given) or P over its experts, a NaN sum counting as -inf; ranked by (score, lower index).
template <int EPL>
__device__ __forceinline__ uint32_t token_group_mask(const RouteParams& p, int lane, const float (&P)[EPL]) {
  if (p.n_group <= 1) return 1u;
  uint32_t gv[EPL];
  int gid[EPL];
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = lane + 32 * i;
    gv[i] = e < p.E ? order_key(p.bias ? clean_key(P[i] + p.bias[e]) : P[i]) : kUnavailable;
    gid[i] = e < p.E ? group_of(p, e) : -1;
  }
  float mine = -INFINITY;
  for (int g = 0; g < p.n_group; ++g) {
    uint32_t l1 = kUnavailable, l2 = kUnavailable;  // this lane's best two keys in group g
#pragma unroll
    for (int i = 0; i < EPL; ++i)
      if (gid[i] == g) {
        if (gv[i] > l1) { l2 = l1; l1 = gv[i]; }
        else if (gv[i] > l2) { l2 = gv[i]; }
      }
    const uint32_t m1 = __reduce_max_sync(kFull, l1);
    float score = from_order_key(m1);
    if (p.group_scoring == GroupScoring::kTop2Sum) {
      // the second best: the best once one instance of m1 (the lowest lane holding it) is removed
      const int owner = __ffs(__ballot_sync(kFull, l1 == m1)) - 1;
      const uint32_t m2 = __reduce_max_sync(kFull, lane == owner ? l2 : l1);
      score = score + from_order_key(m2);
    }
    if (lane == g) mine = clean_group_score(score);
  }
  int rank = 0;  // groups ranked before lane's group g
  for (int q = 0; q < p.n_group; ++q) {
    const float sq = __shfl_sync(kFull, mine, q);
    rank += (sq > mine) || (sq == mine && q < lane);
  }
  return __ballot_sync(kFull, lane < p.n_group && rank < p.topk_group);
}

// Selection keys of one row; experts >= E, and those outside the token's groups (gmask), are unavailable.
template <int EPL>
__device__ __forceinline__ void make_keys(const RouteParams& p, int lane, const float (&x)[EPL],
                                          const float (&P)[EPL], uint32_t gmask, uint32_t (&key)[EPL]) {
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = lane + 32 * i;
    const bool ok = e < p.E && ((gmask >> group_of(p, e)) & 1u);
    key[i] = ok ? order_key(p.bias ? clean_key(P[i] + p.bias[e]) : x[i]) : kUnavailable;
  }
}

constexpr int kMaxCandidates = 64;  // threshold top-K: survivors ranked in smem, else the round path

// Per-warp shared scratch of the threshold top-K.
struct WarpTopkScratch {
  unsigned long long heads[32];
  unsigned long long cand[kMaxCandidates];
  float cand_x[kMaxCandidates];
  int out_id[kMaxTopK];
  float out_x[kMaxTopK];
};

// Composite ordering key, unique per expert: (key, then lower id first); 0 = unavailable.
__device__ __forceinline__ unsigned long long composite(uint32_t key, int id) {
  return key == kUnavailable ? 0ull
                             : (static_cast<unsigned long long>(key) << 32) | (0xffffffffu - uint32_t(id));
}

// Top-K over per-lane candidate lists by K rounds. Each lane holds C candidates (key, expert id,
// clean logit). The lane sorts its list (stable odd-even transposition: ties keep the lower id);
// each round takes the warp's best head (redux.max over keys, redux.min over ids for ties) and its
// owner pops it. Only for the rare case of more than kMaxCandidates threshold survivors.
template <int C>
__device__ __forceinline__ void warp_topk_rounds(uint32_t (&key)[C], int (&id)[C], float (&x)[C], int K,
                                              int lane, int& my_id, float& my_x) {
#pragma unroll
  for (int r = 0; r < C; ++r)
#pragma unroll
    for (int i = r & 1; i + 1 < C; i += 2)
      if (key[i] < key[i + 1]) {
        const uint32_t tk = key[i]; key[i] = key[i + 1]; key[i + 1] = tk;
        const int ti = id[i]; id[i] = id[i + 1]; id[i + 1] = ti;
        const float tx = x[i]; x[i] = x[i + 1]; x[i + 1] = tx;
      }
  my_id = -1;
  my_x = -INFINITY;
  for (int k = 0; k < K; ++k) {
    const uint32_t wbest = __reduce_max_sync(kFull, key[0]);
    const uint32_t cand = (key[0] == wbest && wbest != kUnavailable) ? uint32_t(id[0]) : 0xffffffffu;
    const int e = static_cast<int>(__reduce_min_sync(kFull, cand));
    const bool mine = cand == uint32_t(e);
    const int owner = __ffs(__ballot_sync(kFull, mine)) - 1;
    const float xe = __shfl_sync(kFull, x[0], owner < 0 ? 0 : owner);
    if (mine) {
#pragma unroll
      for (int i = 0; i + 1 < C; ++i) { key[i] = key[i + 1]; id[i] = id[i + 1]; x[i] = x[i + 1]; }
      key[C - 1] = kUnavailable;
    }
    if (lane == k) { my_id = e; my_x = xe; }
  }
}

// Top-K of the candidates the warp's lanes hold (C each; at least K available in the warp, and at
// least K lanes holding one), best first, ties to the lower id. Lane k (< K) receives the k-th
// expert id and its clean logit.
// Threshold method, no sequential rounds: tau = the K-th best lane head (each lane's best candidate);
// at least K candidates are >= tau, so nothing below it can be in the top K. The survivors (usually
// ~K) are compacted into shared memory and each one's rank is a count of better survivors.
template <int C>
__device__ __forceinline__ void warp_topk(uint32_t (&key)[C], int (&id)[C], float (&x)[C], int K, int lane,
                                          WarpTopkScratch& ws, int& my_id, float& my_x) {
  unsigned long long comp[C], head = 0;
#pragma unroll
  for (int i = 0; i < C; ++i) {
    comp[i] = composite(key[i], id[i]);
    head = comp[i] > head ? comp[i] : head;
  }
  ws.heads[lane] = head;
  __syncwarp();
  int head_rank = 0;
  const ulonglong2* h2 = reinterpret_cast<const ulonglong2*>(ws.heads);
#pragma unroll
  for (int q = 0; q < 16; ++q) {
    const ulonglong2 v = h2[q];
    head_rank += (v.x > head) + (v.y > head);
  }
  const int tau_lane = __ffs(__ballot_sync(kFull, head_rank == K - 1)) - 1;
  const unsigned long long tau = tau_lane >= 0 ? ws.heads[tau_lane] : 0ull;
  int n = 0;
#pragma unroll
  for (int i = 0; i < C; ++i) {
    const bool keep = comp[i] >= tau;
    const unsigned m = __ballot_sync(kFull, keep);
    const int pos = n + __popc(m & ((1u << lane) - 1u));
    if (keep && pos < kMaxCandidates) { ws.cand[pos] = comp[i]; ws.cand_x[pos] = x[i]; }
    n += __popc(m);
  }
  if (n > kMaxCandidates) {  // warp-uniform: many exact ties at the threshold
    __syncwarp();
    warp_topk_rounds<C>(key, id, x, K, lane, my_id, my_x);
    return;
  }
  __syncwarp();
  for (int r = lane; r < n; r += 32) {
    const unsigned long long c = ws.cand[r];
    int rank = 0;
#pragma unroll 4
    for (int q = 0; q < n; ++q) rank += ws.cand[q] > c;
    if (rank < K) {
      ws.out_id[rank] = int(0xffffffffu - uint32_t(c & 0xffffffffu));
      ws.out_x[rank] = ws.cand_x[r];
    }
  }
  __syncwarp();
  my_id = lane < K ? ws.out_id[lane] : -1;
  my_x = lane < K ? ws.out_x[lane] : -INFINITY;
  __syncwarp();
}

// Natural top-K of a full row held as x[i] / P[i] = logit / probability of expert lane + 32 i, among
// the experts of the token's groups (gmask).
template <int EPL>
__device__ __forceinline__ void warp_topk_row(const RouteParams& p, int lane, const float (&x)[EPL],
                                              const float (&P)[EPL], uint32_t gmask, WarpTopkScratch& ws,
                                              int& my_id, float& my_x) {
  uint32_t key[EPL];
  int id[EPL];
  float xs[EPL];
  make_keys(p, lane, x, P, gmask, key);
#pragma unroll
  for (int i = 0; i < EPL; ++i) { id[i] = lane + 32 * i; xs[i] = x[i]; }
  warp_topk<EPL>(key, id, xs, p.K, lane, ws, my_id, my_x);
}

// Top-K among the kept experts only: candidate j = kept[j] (ascending ids), j < Bk, its logit
// gathered from `row_x` (the smem stash) or from the logits in global memory. Grouped routing: the
// kept experts of the token's groups (gmask) first, then, if they are fewer than K, the best of the
// other kept experts fill the remaining slots.
template <typename Tin, int C>
__device__ __forceinline__ void warp_topk_kept(const RouteParams& p, int t, int lane, const int32_t* kept,
                                               const float* row_x, float m, float inv, uint32_t gmask,
                                               WarpTopkScratch& ws, int& my_id, float& my_x) {
  uint32_t key[C], out_key[C];
  int id[C];
  float xs[C];
  int n_in = 0;
  const Tin* row = static_cast<const Tin*>(p.logits) + static_cast<int64_t>(t) * p.logits_stride;
#pragma unroll
  for (int i = 0; i < C; ++i) {
    const int j = lane + 32 * i;
    const bool ok = j < p.num_kept;
    const int e = ok ? kept[j] : 0;
    const float xe = !ok ? -INFINITY : (row_x ? row_x[e] : clean_logit(to_float(row[e])));
    const float k = p.bias ? clean_key(prob_of(xe, p.scoring, m, inv) + p.bias[e]) : xe;
    const bool in = ok && ((gmask >> group_of(p, e)) & 1u);
    key[i] = in ? order_key(k) : kUnavailable;
    out_key[i] = ok && !in ? order_key(k) : kUnavailable;
    n_in += in;
    id[i] = e;
    xs[i] = xe;
  }
  if (p.n_group > 1) n_in = __reduce_add_sync(kFull, n_in);  // warp-uniform
  if (p.n_group <= 1 || n_in >= p.K) {
    warp_topk<C>(key, id, xs, p.K, lane, ws, my_id, my_x);
    return;
  }
  int in_id = -1, out_id;
  float in_x = -INFINITY, out_x;
  if (n_in > 0) warp_topk<C>(key, id, xs, n_in, lane, ws, in_id, in_x);
  warp_topk<C>(out_key, id, xs, p.K - n_in, lane, ws, out_id, out_x);
  const int src = lane >= n_in ? lane - n_in : 0;
  out_id = __shfl_sync(kFull, out_id, src);
  out_x = __shfl_sync(kFull, out_x, src);
  my_id = lane < n_in ? in_id : (lane < p.K ? out_id : -1);
  my_x = lane < n_in ? in_x : (lane < p.K ? out_x : -INFINITY);
}

// Writes one token's weights/ids (lane k: expert id or -1, and its clean logit) and pair slots
// (kept-expert position: slot_of[id], or id itself when every expert is kept).
__device__ __forceinline__ void write_token(const RouteParams& p, int t, int lane, int id, float xid,
                                            float m, float s, const int32_t* slot_of, int32_t* pair_slot) {
  float w = (lane < p.K && id >= 0) ? prob_of(xid, p.scoring, m, s) : 0.f;
  if (p.renormalize) {
    const float sum = device::warp_sum(w);
    w = sum > 0.f ? w / sum : 0.f;
  }
  w *= p.scale;
  if (lane < p.K) {
    const int64_t o = static_cast<int64_t>(t) * p.K + lane;
    p.weights[o] = w;
    p.ids[o] = id;
    if (pair_slot) pair_slot[o] = id < 0 ? -1 : (slot_of ? slot_of[id] : id);
  }
}

// Per-token scratch the passes exchange (shared memory in the fused path, global in the other).
struct TokenScratch {
  float* stat_m;       // [T]
  float* stat_s;       // [T] inverse softmax sums (see prob_of)
  int32_t* nat_id;     // [T*K] natural experts (truncation; protected tokens)
  float* nat_x;        // [T*K] their clean logits
  int32_t* pair_slot;  // [T*K] kept-expert position of each pair, -1 dropped; nullptr: no grouping
  float* stash;        // [T*E] clean logits, or nullptr (re-picks gather from global memory)
  uint32_t* group_mask;  // [T] each token's group mask (grouped routing under a budget), else nullptr
  int32_t* prot;       // [E] protected-expert flags to set, or nullptr (marked later from nat_id)
  WarpTopkScratch* topk;  // [warps of the block] shared
};

// Natural top-K of token t under a budget (truncation, protected tokens): kept in `ts` for pass 3,
// and a protected token's experts are flagged.
template <int EPL>
__device__ __forceinline__ void natural_pass(const RouteParams& p, int t, int lane, const float (&x)[EPL],
                                             const float (&P)[EPL], uint32_t gmask, const TokenScratch& ts) {
  int id;
  float xid;
  warp_topk_row(p, lane, x, P, gmask, ts.topk[threadIdx.x >> 5], id, xid);
  if (lane < p.K) {
    ts.nat_id[static_cast<int64_t>(t) * p.K + lane] = id;
    ts.nat_x[static_cast<int64_t>(t) * p.K + lane] = xid;
    if (ts.prot && p.protect && p.protect[t]) ts.prot[id] = 1;  // idempotent writes of 1
  }
}

// Pass 1 for one token (one warp): softmax stats, budget score accumulation, and the natural top-K
// where it is needed here (no budget: the token is final; truncation; protected tokens unless
// `protected_elsewhere`, i.e. spare warps of the fused block do those in parallel).
template <int EPL>
__device__ __forceinline__ void token_pass(const RouteParams& p, int t, int lane, const float (&x)[EPL],
                                           bool budget, bool protected_elsewhere, float (&acc)[EPL],
                                           const TokenScratch& ts) {
  float P[EPL], m, s;
  row_probs(p, x, P, m, s);
  const uint32_t gmask = token_group_mask(p, lane, P);
  if (budget) {
    if (ts.group_mask && lane == 0) ts.group_mask[t] = gmask;
    const float tw = p.token_weights ? clean_token_weight(p.token_weights[t]) : 1.f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) acc[i] += tw * P[i];
    if (lane == 0) { ts.stat_m[t] = m; ts.stat_s[t] = s; }
    if (ts.stash) {
#pragma unroll
      for (int i = 0; i < EPL; ++i)
        if (lane + 32 * i < p.E) ts.stash[t * p.E + lane + 32 * i] = x[i];
    }
    if (p.policy == Policy::kTruncate || (!protected_elsewhere && p.protect != nullptr && p.protect[t]))
      natural_pass(p, t, lane, x, P, gmask, ts);
    return;
  }
  int id;
  float xid;
  warp_topk_row(p, lane, x, P, gmask, ts.topk[threadIdx.x >> 5], id, xid);
  write_token(p, t, lane, id, xid, m, s, nullptr, ts.pair_slot);
}

// Pass 3 for one token under a budget: substitution (top-K among the kept experts, kept[0, Bk)) or
// truncation (natural slots whose expert was dropped become -1).
template <typename Tin, int EPL>
__device__ __forceinline__ void finalize_pass(const RouteParams& p, int t, int lane, const int32_t* kept,
                                              const int32_t* slot_of, const TokenScratch& ts) {
  const float m = ts.stat_m[t], s = ts.stat_s[t];
  const uint32_t gmask = ts.group_mask ? ts.group_mask[t] : 1u;
  int id = -1;
  float xid = -INFINITY;
  if (p.policy == Policy::kTruncate) {
    if (lane < p.K) {
      const int64_t o = static_cast<int64_t>(t) * p.K + lane;
      const int e = ts.nat_id[o];
      if (slot_of[e] >= 0) { id = e; xid = ts.nat_x[o]; }
    }
  } else if (p.protect != nullptr && p.protect[t] &&
             __all_sync(kFull, lane >= p.K || slot_of[ts.nat_id[static_cast<int64_t>(t) * p.K + lane]] >= 0)) {
    // A protected token whose natural experts all survived: substitution would re-pick exactly them.
    if (lane < p.K) {
      id = ts.nat_id[static_cast<int64_t>(t) * p.K + lane];
      xid = ts.nat_x[static_cast<int64_t>(t) * p.K + lane];
    }
  } else {
    const float* row_x = ts.stash ? ts.stash + t * p.E : nullptr;
    // Candidates per lane = ceil(Bk / 32): a budget of <= 32 experts is one candidate per lane.
    if (p.num_kept <= 32)
      warp_topk_kept<Tin, 1>(p, t, lane, kept, row_x, m, s, gmask, ts.topk[threadIdx.x >> 5], id, xid);
    else if (EPL <= 2 || p.num_kept <= 64)
      warp_topk_kept<Tin, (EPL < 2 ? EPL : 2)>(p, t, lane, kept, row_x, m, s, gmask, ts.topk[threadIdx.x >> 5], id, xid);
    else if (EPL <= 4 || p.num_kept <= 128)
      warp_topk_kept<Tin, (EPL < 4 ? EPL : 4)>(p, t, lane, kept, row_x, m, s, gmask, ts.topk[threadIdx.x >> 5], id, xid);
    else if (EPL <= 8 || p.num_kept <= 256)
      warp_topk_kept<Tin, (EPL < 8 ? EPL : 8)>(p, t, lane, kept, row_x, m, s, gmask, ts.topk[threadIdx.x >> 5], id, xid);
    else
      warp_topk_kept<Tin, EPL>(p, t, lane, kept, row_x, m, s, gmask, ts.topk[threadIdx.x >> 5], id, xid);
  }
  write_token(p, t, lane, id, xid, m, s, slot_of, ts.pair_slot);
}

// Visits tokens t0, t0+stride, ... < t1 with the next row's load in flight while one is processed.
template <typename Tin, int EPL, typename F>
__device__ __forceinline__ void for_each_row(const RouteParams& p, int t0, int t1, int stride, int lane, F&& f) {
  if (t0 >= t1) return;
  RawRow<Tin, EPL> next;
  load_raw(p, t0, lane, next);
  for (int t = t0; t < t1; t += stride) {
    const RawRow<Tin, EPL> cur = next;
    if (t + stride < t1) load_raw(p, t + stride, lane, next);
    float x[EPL];
    clean_row(p, lane, cur, x);
    f(t, x);
  }
}

// Block-wide (blockDim >= E): keep the Bk best experts by (protected, score, -id). Thread e < E
// passes its score and protected flag; writes slot_of[e] (-1 if dropped), kept[slot] = e (both may be
// shared or global) and p.kept_experts. keys: [E] uint64 shared (16-byte aligned); tot: 33 ints shared.
__device__ __forceinline__ void select_kept(const RouteParams& p, float score, int prot,
                                            unsigned long long* keys, int* tot, int32_t* slot_of,
                                            int32_t* kept) {
  const int e = threadIdx.x, E = p.E;
  unsigned long long key = 0;
  if (e < E) {
    key = (static_cast<unsigned long long>(prot != 0) << 41) |
          (static_cast<unsigned long long>(order_key(score)) << 9) | static_cast<unsigned>(511 - e);
    keys[e] = key;
  }
  __syncthreads();
  int is_kept = 0;
  if (e < E) {
    const ulonglong2* k2 = reinterpret_cast<const ulonglong2*>(keys);
    int r0 = 0, r1 = 0;
#pragma unroll 8
    for (int q = 0; q < E / 2; ++q) {
      const ulonglong2 v = k2[q];
      r0 += v.x > key;
      r1 += v.y > key;
    }
    if (E & 1) r0 += keys[E - 1] > key;
    is_kept = r0 + r1 < p.num_kept;
  }
  int total;
  const int slot = block_exclusive_scan(is_kept, tot, &total);
  if (e < E) {
    slot_of[e] = is_kept ? slot : -1;
    if (is_kept) {
      kept[slot] = e;
      if (p.kept_experts != kept) p.kept_experts[slot] = e;
    }
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Fused path: T <= kFusedMaxTokens, one block of >= E threads (token passes use min(warps, T) warps).
struct FusedLayout {
  size_t keys, topk, stat_m, stat_s, nat_id, nat_x, pair_slot, stash, slot_of, kept, prot, partial,
      tokmask, offsets, tot, group_mask, bytes;
};

__host__ __device__ inline FusedLayout fused_layout(int T, int E, int K, int warps, int token_warps) {
  FusedLayout L;
  const int words = (T + 31) / 32;
  size_t o = 0;
  auto take = [&](size_t bytes) { const size_t at = o; o += (bytes + 15) / 16 * 16; return at; };
  L.keys = take(sizeof(unsigned long long) * E);
  L.topk = take(sizeof(WarpTopkScratch) * warps);
  L.stat_m = take(sizeof(float) * T);
  L.stat_s = take(sizeof(float) * T);
  L.nat_id = take(sizeof(int32_t) * T * K);
  L.nat_x = take(sizeof(float) * T * K);
  L.pair_slot = take(sizeof(int32_t) * T * K);
  L.stash = T * E <= kStashMaxFloats ? take(sizeof(float) * T * E) : size_t(-1);
  L.slot_of = take(sizeof(int32_t) * E);
  L.kept = take(sizeof(int32_t) * E);
  L.prot = take(sizeof(int32_t) * E);
  L.partial = take(sizeof(float) * token_warps * E);
  L.tokmask = take(sizeof(uint32_t) * E * words);
  L.offsets = take(sizeof(int32_t) * (E + 1));
  L.tot = take(sizeof(int32_t) * 33);
  L.group_mask = take(sizeof(uint32_t) * T);
  L.bytes = o;
  return L;
}

// Grouping for small T: per kept expert a bitmask over tokens (a token uses an expert at most once),
// so a pair's position is offsets[slot] + (tokens before it in that expert's mask). `tokmask`
// ([Bk][ceil(T/32)] words) must be zero on entry. Deterministic, no ordering-dependent atomics.
__device__ __forceinline__ void group_by_token_masks(const RouteParams& p, const int32_t* pair_slot,
                                                     uint32_t* tokmask, int32_t* offsets, int* tot) {
  const int Bk = p.num_kept, N = p.T * p.K, words = (p.T + 31) / 32;
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    const int j = pair_slot[i], t = i / p.K;
    if (j >= 0) atomicOr(&tokmask[j * words + (t >> 5)], 1u << (t & 31));
  }
  __syncthreads();
  int c = 0;
  if (threadIdx.x < Bk)
    for (int w = 0; w < words; ++w) c += __popc(tokmask[threadIdx.x * words + w]);
  int total;
  const int off = block_exclusive_scan(c, tot, &total);
  if (threadIdx.x < Bk) {
    offsets[threadIdx.x] = off;
    p.expert_offsets[threadIdx.x] = off;
    p.expert_counts[threadIdx.x] = c;
  }
  if (threadIdx.x == 0) p.expert_offsets[Bk] = total;
  __syncthreads();
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    const int j = pair_slot[i], t = i / p.K;
    if (j < 0) continue;
    const uint32_t* mask = tokmask + j * words;
    int pos = offsets[j] + __popc(mask[t >> 5] & ((1u << (t & 31)) - 1u));
    for (int w = 0; w < (t >> 5); ++w) pos += __popc(mask[w]);
    p.sorted_pairs[pos] = i;
  }
  for (int i = total + threadIdx.x; i < N; i += blockDim.x) p.sorted_pairs[i] = -1;
}

template <typename Tin, int EPL, int kThreads>
__global__ void __launch_bounds__(kThreads) route_fused_kernel(const RouteParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int T = p.T, E = p.E;
  const int token_warps = min(int(blockDim.x) / 32, T);
  const FusedLayout L = fused_layout(T, E, p.K, int(blockDim.x) / 32, token_warps);
  TokenScratch ts;
  ts.stat_m = reinterpret_cast<float*>(smem + L.stat_m);
  ts.stat_s = reinterpret_cast<float*>(smem + L.stat_s);
  ts.nat_id = reinterpret_cast<int32_t*>(smem + L.nat_id);
  ts.nat_x = reinterpret_cast<float*>(smem + L.nat_x);
  ts.pair_slot = p.group ? reinterpret_cast<int32_t*>(smem + L.pair_slot) : nullptr;
  ts.stash = L.stash == size_t(-1) ? nullptr : reinterpret_cast<float*>(smem + L.stash);
  ts.prot = reinterpret_cast<int32_t*>(smem + L.prot);
  ts.topk = reinterpret_cast<WarpTopkScratch*>(smem + L.topk);
  ts.group_mask = p.n_group > 1 ? reinterpret_cast<uint32_t*>(smem + L.group_mask) : nullptr;
  auto* keys = reinterpret_cast<unsigned long long*>(smem + L.keys);
  int32_t* slot_of = reinterpret_cast<int32_t*>(smem + L.slot_of);
  int32_t* kept = reinterpret_cast<int32_t*>(smem + L.kept);
  float* partial = reinterpret_cast<float*>(smem + L.partial);
  uint32_t* tokmask = reinterpret_cast<uint32_t*>(smem + L.tokmask);
  int* tot = reinterpret_cast<int*>(smem + L.tot);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool budget = p.num_kept < E;
  ROUTE_PHASE(0);
  if (threadIdx.x < E) ts.prot[threadIdx.x] = 0;
  if (p.group)
    for (int i = threadIdx.x; i < p.num_kept * ((T + 31) / 32); i += blockDim.x) tokmask[i] = 0;
  if (budget && p.protect) __syncthreads();  // prot is zero before token passes mark it

  // Warps beyond the token warps take the protected tokens' natural top-K, in parallel with pass 1.
  const int spare_warps = int(blockDim.x) / 32 - token_warps;
  const bool protected_elsewhere = budget && p.protect != nullptr && spare_warps > 0 &&
                                   p.policy == Policy::kSubstitute;
  float acc[EPL];
#pragma unroll
  for (int i = 0; i < EPL; ++i) acc[i] = 0.f;
  if (warp < token_warps) {
    for_each_row<Tin, EPL>(p, warp, T, token_warps, lane, [&](int t, const float(&x)[EPL]) {
      token_pass(p, t, lane, x, budget, protected_elsewhere, acc, ts);
    });
  } else if (protected_elsewhere) {
    for (int t = warp - token_warps; t < T; t += spare_warps) {
      if (!p.protect[t]) continue;
      RawRow<Tin, EPL> raw;
      load_raw(p, t, lane, raw);
      float x[EPL], P[EPL], m, inv;
      clean_row(p, lane, raw, x);
      row_probs(p, x, P, m, inv);
      natural_pass(p, t, lane, x, P, token_group_mask(p, lane, P), ts);
    }
  }
  ROUTE_PHASE(1);

  if (budget) {
    if (warp < token_warps) {
#pragma unroll
      for (int i = 0; i < EPL; ++i)
        if (lane + 32 * i < E) partial[warp * E + lane + 32 * i] = acc[i];
    }
    __syncthreads();
    float score = 0.f;
    if (threadIdx.x < E) {
#pragma unroll 8
      for (int w = 0; w < token_warps; ++w) score += partial[w * E + threadIdx.x];
    }
    ROUTE_PHASE(2);
    select_kept(p, score, threadIdx.x < E ? ts.prot[threadIdx.x] : 0, keys, tot, slot_of, kept);
    ROUTE_PHASE(3);
    if (warp < token_warps)
      for (int t = warp; t < T; t += token_warps) finalize_pass<Tin, EPL>(p, t, lane, kept, slot_of, ts);
  }
  ROUTE_PHASE(4);
  if (p.group) {
    if (!budget && threadIdx.x < E) p.kept_experts[threadIdx.x] = threadIdx.x;
    __syncthreads();
    ROUTE_PHASE(5);
    group_by_token_masks(p, ts.pair_slot, tokmask, reinterpret_cast<int32_t*>(smem + L.offsets), tot);
  }
  ROUTE_PHASE(6);
}

// ---------------------------------------------------------------------------------------------
// Multi-block path (T > kFusedMaxTokens). Workspace (global): stat_m[T] stat_s[T] | nat_id[T*K]
// nat_x[T*K] pair_slot[T*K] | slot_of[E] | partials[num_token_blocks * E] | group_mask[T]. Kept experts go straight
// to p.kept_experts, which the finalize pass reads.
__host__ __device__ inline int num_token_blocks(int T) { return (T + kTokensPerBlock - 1) / kTokensPerBlock; }

struct Workspace {
  TokenScratch ts;
  int32_t* slot_of;
  float* partials;
};

__host__ __device__ inline Workspace carve_workspace(void* base, int T, int E, int K, bool group) {
  Workspace w;
  w.ts.stat_m = static_cast<float*>(base);
  w.ts.stat_s = w.ts.stat_m + T;
  w.ts.nat_id = reinterpret_cast<int32_t*>(w.ts.stat_s + T);
  w.ts.nat_x = reinterpret_cast<float*>(w.ts.nat_id + size_t(T) * K);
  int32_t* pair_slot = reinterpret_cast<int32_t*>(w.ts.nat_x + size_t(T) * K);
  w.ts.pair_slot = group ? pair_slot : nullptr;
  w.ts.stash = nullptr;
  w.ts.prot = nullptr;
  w.ts.topk = nullptr;  // each kernel points it at its own shared memory
  w.slot_of = pair_slot + size_t(T) * K;
  w.partials = reinterpret_cast<float*>(w.slot_of + E);
  w.ts.group_mask = reinterpret_cast<uint32_t*>(w.partials + size_t(num_token_blocks(T)) * E);
  return w;
}

__host__ __device__ inline size_t workspace_bytes(int T, int E, int K) {
  return sizeof(float) * 2 * size_t(T) + sizeof(int32_t) * 3 * size_t(T) * K + sizeof(int32_t) * E +
         sizeof(float) * size_t(num_token_blocks(T)) * E + sizeof(uint32_t) * size_t(T);
}

template <typename Tin, int EPL>
__global__ void __launch_bounds__(kTokenBlockThreads) route_tokens_kernel(const RouteParams p, Workspace ws) {
  constexpr int kWarps = kTokenBlockThreads / 32;
  __shared__ float partial[kWarps * kMaxExperts];
  __shared__ __align__(16) WarpTopkScratch topk[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool budget = p.num_kept < p.E;
  const int t0 = blockIdx.x * kTokensPerBlock, t1 = min(p.T, t0 + kTokensPerBlock);
  TokenScratch ts = ws.ts;
  ts.topk = topk;
  float acc[EPL];
#pragma unroll
  for (int i = 0; i < EPL; ++i) acc[i] = 0.f;
  for_each_row<Tin, EPL>(p, t0 + warp, t1, kWarps, lane, [&](int t, const float(&x)[EPL]) {
    token_pass(p, t, lane, x, budget, false, acc, ts);
  });
  if (!budget) return;
#pragma unroll
  for (int i = 0; i < EPL; ++i)
    if (lane + 32 * i < p.E) partial[warp * p.E + lane + 32 * i] = acc[i];
  __syncthreads();
  for (int e = threadIdx.x; e < p.E; e += kTokenBlockThreads) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w * p.E + e];
    ws.partials[size_t(blockIdx.x) * p.E + e] = sum;
  }
}

__global__ void __launch_bounds__(kSelectThreads) route_select_kernel(const RouteParams p, Workspace ws) {
  __shared__ __align__(16) unsigned long long keys[kMaxExperts];
  __shared__ int32_t prot[kMaxExperts];
  __shared__ int tot[33];
  const int e = threadIdx.x, nblk = num_token_blocks(p.T);
  float score = 0.f;
  if (e < p.E) {
#pragma unroll 8
    for (int b = 0; b < nblk; ++b) score += ws.partials[size_t(b) * p.E + e];
    prot[e] = 0;
  }
  __syncthreads();
  if (p.protect)
    for (int i = threadIdx.x; i < p.T * p.K; i += blockDim.x)
      if (p.protect[i / p.K]) prot[ws.ts.nat_id[i]] = 1;
  __syncthreads();
  select_kept(p, score, e < p.E ? prot[e] : 0, keys, tot, ws.slot_of, p.kept_experts);
}

template <typename Tin, int EPL>
__global__ void __launch_bounds__(kTokenBlockThreads) route_finalize_kernel(const RouteParams p, Workspace ws) {
  constexpr int kWarps = kTokenBlockThreads / 32;
  __shared__ __align__(16) WarpTopkScratch topk[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int t0 = blockIdx.x * kTokensPerBlock, t1 = min(p.T, t0 + kTokensPerBlock);
  TokenScratch ts = ws.ts;
  ts.topk = topk;
  for (int t = t0 + warp; t < t1; t += kWarps)
    finalize_pass<Tin, EPL>(p, t, lane, p.kept_experts, ws.slot_of, ts);
}

// Grouping for large T: stable counting sort. Each warp owns a contiguous range of pairs; peers with
// the same slot in a 32-pair round are ranked with match.any; per-warp histograms are scanned in
// (slot, warp) order.
__global__ void __launch_bounds__(kGroupThreads) route_group_kernel(const RouteParams p, Workspace ws) {
  constexpr int kWarps = kGroupThreads / 32;
  __shared__ int tot[33];
  extern __shared__ __align__(16) int32_t hist[];  // [kWarps][Bk]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int Bk = p.num_kept, N = p.T * p.K;
  const int32_t* pair_slot = ws.ts.pair_slot;
  if (Bk >= p.E)
    for (int e = threadIdx.x; e < p.E; e += blockDim.x) p.kept_experts[e] = e;
  const int seg = (N + kWarps - 1) / kWarps;
  const int lo = min(N, warp * seg), hi = min(N, lo + seg);
  for (int i = threadIdx.x; i < kWarps * Bk; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  int32_t* my_hist = hist + warp * Bk;
  // Visits the warp's pairs in rounds of 32 (kBatch rounds' loads issued together): f(i, slot, peers).
  constexpr int kBatch = 4;
  auto for_each_round = [&](auto&& f) {
    for (int base = lo; base < hi; base += 32 * kBatch) {
      int j[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int i = base + 32 * u + lane;
        j[u] = i < hi ? pair_slot[i] : -1;
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) f(base + 32 * u + lane, j[u], __match_any_sync(kFull, j[u]));
    }
  };
  for_each_round([&](int, int j, unsigned peers) {
    if (j >= 0 && lane == __ffs(peers) - 1) my_hist[j] += __popc(peers);
    __syncwarp();
  });
  __syncthreads();
  int c = 0;
  if (threadIdx.x < Bk)
    for (int w = 0; w < kWarps; ++w) c += hist[w * Bk + threadIdx.x];
  int total;
  const int off = block_exclusive_scan(c, tot, &total);
  if (threadIdx.x < Bk) {
    p.expert_counts[threadIdx.x] = c;
    p.expert_offsets[threadIdx.x] = off;
    int run = off;
    for (int w = 0; w < kWarps; ++w) {
      const int n = hist[w * Bk + threadIdx.x];
      hist[w * Bk + threadIdx.x] = run;
      run += n;
    }
  }
  if (threadIdx.x == 0) p.expert_offsets[Bk] = total;
  __syncthreads();
  for_each_round([&](int i, int j, unsigned peers) {
    const int start = j >= 0 ? my_hist[j] : 0;
    __syncwarp();
    if (j >= 0) {
      p.sorted_pairs[start + __popc(peers & ((1u << lane) - 1u))] = i;
      if (lane == __ffs(peers) - 1) my_hist[j] = start + __popc(peers);
    }
    __syncwarp();
  });
  for (int i = total + threadIdx.x; i < N; i += blockDim.x) p.sorted_pairs[i] = -1;
}

// ---------------------------------------------------------------------------------------------
template <typename Tin, int EPL>
cudaError_t launch_route_typed(const RouteParams& p, cudaStream_t stream) {
  if (p.T <= kFusedMaxTokens) {
    // Selection and grouping need a thread per expert; token passes use min(warps, T) warps.
    constexpr int kThreads = EPL >= 8 ? 512 : 1024;  // 1024 threads cap registers at 64: spills at EPL 8
    static_assert(kThreads >= 32 * EPL, "a thread per expert");
    const int need = max(max((p.E + 31) / 32, 2), min(p.T, kThreads / 32));  // warps
    const int threads = 32 * min(kThreads / 32, need);
    const FusedLayout L = fused_layout(p.T, p.E, p.K, threads / 32, min(threads / 32, p.T));
    auto kernel = route_fused_kernel<Tin, EPL, kThreads>;
    if (L.bytes > 48 * 1024) {
      const cudaError_t err =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(L.bytes));
      if (err != cudaSuccess) return err;
    }
    kernel<<<1, threads, L.bytes, stream>>>(p);
    return cudaGetLastError();
  }
  if (p.workspace == nullptr) return cudaErrorInvalidValue;
  const Workspace ws = carve_workspace(p.workspace, p.T, p.E, p.K, p.group);
  const bool budget = p.num_kept < p.E;
  const int nblk = num_token_blocks(p.T);
  route_tokens_kernel<Tin, EPL><<<nblk, kTokenBlockThreads, 0, stream>>>(p, ws);
  if (budget) {
    route_select_kernel<<<1, kSelectThreads, 0, stream>>>(p, ws);
    route_finalize_kernel<Tin, EPL><<<nblk, kTokenBlockThreads, 0, stream>>>(p, ws);
  }
  if (p.group) {
    const size_t smem = sizeof(int32_t) * (kGroupThreads / 32) * p.num_kept;
    if (smem > 48 * 1024) {
      const cudaError_t err = cudaFuncSetAttribute(route_group_kernel,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (err != cudaSuccess) return err;
    }
    route_group_kernel<<<1, kGroupThreads, smem, stream>>>(p, ws);
  }
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace routing
}  // namespace specmoe
