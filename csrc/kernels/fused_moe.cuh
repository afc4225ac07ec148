// Fused MoE expert FFN kernels. Contract, shapes and algorithm: fused_moe.h.
//
// MMA fragment trick used by both kernels (mma.sync m16n8k16, A = 16 weight rows, B = 8 tokens):
// a thread (g = lane / 4, c = lane % 4) loads 16 bytes = 8 consecutive k of weight rows g and g + 8
// and of token g, at k0 + 8c of a 32-wide chunk. The MMA's logical k {2c, 2c+1, 2c+8, 2c+9} of step
// s in {0, 1} is taken from physical k0 + 8c + 4s + {0, 1, 2, 3}, for weights and tokens alike: a
// permutation of the reduction order, so the sum is unchanged and no shared-memory staging is needed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "mma.cuh"
#include "fused_moe.h"

namespace specmoe {
namespace fused_moe {
namespace detail {

using device::kFull;

constexpr int kGateUpWarps = 4;
constexpr int kGateUpCtasPerSm = 3;
constexpr int kDownWarps = 16;
constexpr int kPipe = 4;          // gate_up: 32-wide chunks whose loads are in flight per thread
constexpr int kDownPipe = 6;      // down: the same (its CTAs are one per SM: it needs more in flight)
constexpr int kNTiles = 2;        // token tiles of 8 per gate_up pass (16 pairs; more = more passes)
constexpr int kMaxUnits = kTokenTile * 16 / 8 + kMaxExperts;  // (expert, 8 pairs) units per down CTA

using device::Mma;

// One 32-wide k chunk: weight rows g (wa) and g + 8 (wb) times token g (xb); two MMA k-steps.
template <typename T>
__device__ __forceinline__ void mma_chunk(float (&c)[4], const uint4& wa, const uint4& wb, const uint4& xb) {
  const uint32_t a0[4] = {wa.x, wb.x, wa.y, wb.y}, a1[4] = {wa.z, wb.z, wa.w, wb.w};
  Mma<T>::run(c, a0, xb.x, xb.y);
  Mma<T>::run(c, a1, xb.z, xb.w);
}

// Weights are read once per launch: stream them past L1.
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ uint4 load_cached(const void* p) { return __ldg(static_cast<const uint4*>(p)); }

__device__ __forceinline__ float silu(float v) { return v / (1.f + expf(-v)); }

// ---------------------------------------------------------------------------------------------
// Launch 1: act[pos, :] = silu(W1[e] x[token(pos)]) * (W3[e] x[token(pos)]) for every valid pair.
template <typename T>
__global__ void __launch_bounds__(kGateUpWarps * 32) gate_up_kernel(const MoeParams p) {
  __shared__ int active[kMaxExperts];
  __shared__ int n_active_s;
  __shared__ float red[kGateUpWarps][2][kNTiles][32][4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;

  // Kept slots that received pairs, compacted, so work items are spread evenly over the grid.
  if (warp == 0) {
    const int chunk = (p.num_kept + 31) / 32;
    const int j0 = min(p.num_kept, lane * chunk), j1 = min(p.num_kept, j0 + chunk);
    int cnt = 0;
    for (int j = j0; j < j1; ++j) cnt += p.expert_counts[j] > 0;
    const int incl = device::warp_inclusive_scan(cnt);
    int at = incl - cnt;
    for (int j = j0; j < j1; ++j)
      if (p.expert_counts[j] > 0) active[at++] = j;
    if (lane == 31) n_active_s = incl;
  }
  __syncthreads();
  const int row_tiles = p.f / kRowTile;
  const int items = n_active_s * row_tiles;
  const int nchunks = p.h / kChunk;
  const int n_my = (nchunks - warp + kGateUpWarps - 1) / kGateUpWarps;  // chunks warp, warp+4, ...
  const T* x = static_cast<const T*>(p.x);
  T* act = static_cast<T*>(p.act);

  for (int item = blockIdx.x; item < items; item += gridDim.x) {
    const int j = active[item / row_tiles];
    const int r0 = (item % row_tiles) * kRowTile;
    const int e = p.kept_experts[j], off = p.expert_offsets[j], cnt = p.expert_counts[j];
    const T* w = static_cast<const T*>(p.w13) + static_cast<int64_t>(e) * 2 * p.f * p.h;
    const T* gate_a = w + static_cast<int64_t>(r0 + g) * p.h + 8 * c;
    const T* gate_b = gate_a + 8 * static_cast<int64_t>(p.h);
    const T* up_a = gate_a + static_cast<int64_t>(p.f) * p.h;
    const T* up_b = gate_b + static_cast<int64_t>(p.f) * p.h;

    for (int n0 = 0; n0 < cnt; n0 += 8 * kNTiles) {
      const int npairs = min(8 * kNTiles, cnt - n0);
      float cg[kNTiles][4] = {}, cu[kNTiles][4] = {};
      // Software pipeline: the loads of chunks i+1 .. i+kPipe-1 are in flight while chunk i computes.
      uint4 ga[kPipe], gb[kPipe], ua[kPipe], ub[kPipe], xb[kPipe][kNTiles];
      auto load_w = [&](int slot, int i) {
        const int k0 = (warp + i * kGateUpWarps) * kChunk;
        ga[slot] = load_stream(gate_a + k0);
        gb[slot] = load_stream(gate_b + k0);
        ua[slot] = load_stream(up_a + k0);
        ub[slot] = load_stream(up_b + k0);
      };
      // The weights do not depend on the tokens: their first loads go out before the token lookups.
#pragma unroll
      for (int d = 0; d < kPipe; ++d)
        if (d < n_my) load_w(d, d);
      const T* xrow[kNTiles];
      bool xok[kNTiles];
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        const int n = nt * 8 + g;
        xok[nt] = n < npairs;
        const int tok = xok[nt] ? p.sorted_pairs[off + n0 + n] / p.K : 0;
        xrow[nt] = x + static_cast<int64_t>(tok) * p.x_stride + 8 * c;
      }
      auto load_x = [&](int slot, int i) {
        const int k0 = (warp + i * kGateUpWarps) * kChunk;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
          xb[slot][nt] = xok[nt] ? load_cached(xrow[nt] + k0) : make_uint4(0, 0, 0, 0);
      };
      auto load = [&](int slot, int i) { load_w(slot, i); load_x(slot, i); };
#pragma unroll
      for (int d = 0; d < kPipe; ++d)
        if (d < n_my) load_x(d, d);
      for (int base = 0; base < n_my; base += kPipe) {
#pragma unroll
        for (int d = 0; d < kPipe; ++d) {
          const int i = base + d;
          if (i < n_my) {
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt) {
              if (nt * 8 < npairs) {
                mma_chunk<T>(cg[nt], ga[d], gb[d], xb[d][nt]);
                mma_chunk<T>(cu[nt], ua[d], ub[d], xb[d][nt]);
              }
            }
            if (i + kPipe < n_my) load(d, i + kPipe);
          }
        }
      }
      // Split-K over warps: reduce in a fixed order, then SiLU(gate) * up.
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          red[warp][0][nt][lane][r] = cg[nt][r];
          red[warp][1][nt][lane][r] = cu[nt][r];
        }
      __syncthreads();
      for (int o = threadIdx.x; o < kRowTile * npairs; o += blockDim.x) {
        const int r = o % kRowTile, n = o / kRowTile, nt = n / 8, nn = n % 8;
        const int src = (r % 8) * 4 + nn / 2, reg = (r >= 8 ? 2 : 0) + (nn & 1);
        float gs = 0.f, us = 0.f;
#pragma unroll
        for (int w2 = 0; w2 < kGateUpWarps; ++w2) {
          gs += red[w2][0][nt][src][reg];
          us += red[w2][1][nt][src][reg];
        }
        act[static_cast<int64_t>(off + n0 + n) * p.f + r0 + r] = device::from_float<T>(silu(gs) * us);
      }
      __syncthreads();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch 2: y[t, r0:r0+16] = sum over kept experts e and their pairs (t, k) in the CTA's token tile
// of weights[t, k] * W2[e][r0:r0+16, :] act[pair]. One unit = (expert, up to 8 pairs).
struct DownSmem {
  float y_part[kDownWarps][kTokenTile][kRowTile];
  int unit_expert[kMaxUnits];
  int unit_pos[kMaxUnits];
  int unit_n[kMaxUnits];
  int8_t unit_tok[kMaxUnits][8];  // token - t0
  float unit_w[kMaxUnits][8];
  int tot[33];
  int n_units;
};

// First index in sorted[lo, hi) whose value is >= key (values ascending).
__device__ __forceinline__ int lower_bound(const int32_t* sorted, int lo, int hi, int key) {
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (sorted[mid] < key) lo = mid + 1; else hi = mid;
  }
  return lo;
}

template <typename T>
__global__ void __launch_bounds__(kDownWarps * 32) down_kernel(const MoeParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DownSmem& s = *reinterpret_cast<DownSmem*>(smem_raw);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int r0 = blockIdx.x * kRowTile;
  const int t0 = blockIdx.y * kTokenTile, t1 = min(p.T, t0 + kTokenTile);
  const bool whole = gridDim.y == 1;  // one token tile: every pair of every expert is inside

  for (int i = threadIdx.x; i < kDownWarps * (t1 - t0) * kRowTile; i += blockDim.x) {
    const int w = i / ((t1 - t0) * kRowTile), rest = i % ((t1 - t0) * kRowTile);
    s.y_part[w][rest / kRowTile][rest % kRowTile] = 0.f;
  }

  // Unit table: thread per kept slot (blockDim >= Bk is not assumed: slots are strided).
  constexpr int kSlotsPerThread = (kMaxExperts + kDownWarps * 32 - 1) / (kDownWarps * 32);
  int lo[kSlotsPerThread], n_in[kSlotsPerThread], units = 0;
#pragma unroll
  for (int q = 0; q < kSlotsPerThread; ++q) {
    const int j = threadIdx.x * kSlotsPerThread + q;
    lo[q] = 0;
    n_in[q] = 0;
    if (j < p.num_kept) {
      const int off = p.expert_offsets[j], cnt = p.expert_counts[j];
      if (cnt > 0) {
        const int a = whole ? off : lower_bound(p.sorted_pairs, off, off + cnt, t0 * p.K);
        const int b = whole ? off + cnt : lower_bound(p.sorted_pairs, a, off + cnt, t1 * p.K);
        lo[q] = a;
        n_in[q] = b - a;
        units += (b - a + 7) / 8;
      }
    }
  }
  int total;
  int u = device::block_exclusive_scan(units, s.tot, &total);
#pragma unroll
  for (int q = 0; q < kSlotsPerThread; ++q) {
    const int j = threadIdx.x * kSlotsPerThread + q;
    for (int m0 = 0; m0 < n_in[q]; m0 += 8, ++u) {
      const int n = min(8, n_in[q] - m0);
      s.unit_expert[u] = p.kept_experts[j];
      s.unit_pos[u] = lo[q] + m0;
      s.unit_n[u] = n;
      for (int m = 0; m < 8; ++m) {
        const int pair = m < n ? p.sorted_pairs[lo[q] + m0 + m] : 0;
        s.unit_tok[u][m] = static_cast<int8_t>(m < n ? pair / p.K - t0 : 0);
        s.unit_w[u][m] = m < n ? p.weights[pair] : 0.f;
      }
    }
  }
  __syncthreads();

  // Work = (unit, chunk) pairs, unit-major, dealt round-robin to the warps: warp w takes pieces
  // w, w + kDownWarps, ... Each warp accumulates one unit at a time and flushes (weights the 8 pair
  // columns and adds them to its own float32 rows) when its next piece belongs to another unit.
  const int nchunks = p.f / kChunk;
  const int pieces = total * nchunks;
  const int iters = (pieces - warp + kDownWarps - 1) / kDownWarps;
  const T* w2 = static_cast<const T*>(p.w2);
  const T* act = static_cast<const T*>(p.act);
  const int64_t expert_stride = static_cast<int64_t>(p.h) * p.f;
  uint4 wa[kDownPipe], wb[kDownPipe], xb[kDownPipe];
  auto load = [&](int slot, int it) {
    const int piece = warp + it * kDownWarps;
    const int un = piece / nchunks;
    const int k0 = (piece % nchunks) * kChunk + 8 * c;
    const T* wr = w2 + s.unit_expert[un] * expert_stride + static_cast<int64_t>(r0 + g) * p.f + k0;
    wa[slot] = load_stream(wr);
    wb[slot] = load_stream(wr + 8 * static_cast<int64_t>(p.f));
    xb[slot] = g < s.unit_n[un] ? load_cached(act + static_cast<int64_t>(s.unit_pos[un] + g) * p.f + k0)
                                : make_uint4(0, 0, 0, 0);
  };
  float acc[4] = {};
#pragma unroll
  for (int d = 0; d < kDownPipe; ++d)
    if (d < iters) load(d, d);
  for (int base = 0; base < iters; base += kDownPipe) {
#pragma unroll
    for (int d = 0; d < kDownPipe; ++d) {
      const int it = base + d;
      if (it < iters) {
        mma_chunk<T>(acc, wa[d], wb[d], xb[d]);
        const int un = (warp + it * kDownWarps) / nchunks;
        const bool last = it + 1 == iters || (warp + (it + 1) * kDownWarps) / nchunks != un;
        if (last) {
#pragma unroll
          for (int h2 = 0; h2 < 2; ++h2) {
            const int n = 2 * c + h2;
            if (n < s.unit_n[un]) {
              const int tok = s.unit_tok[un][n];
              const float wt = s.unit_w[un][n];
              s.y_part[warp][tok][g] += wt * acc[h2];
              s.y_part[warp][tok][g + 8] += wt * acc[2 + h2];
            }
          }
          acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
        }
        if (it + kDownPipe < iters) load(d, it + kDownPipe);
      }
    }
  }
  __syncthreads();
  T* y = static_cast<T*>(p.y);
  for (int o = threadIdx.x; o < (t1 - t0) * kRowTile; o += blockDim.x) {
    const int tok = o / kRowTile, r = o % kRowTile;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kDownWarps; ++w) v += s.y_part[w][tok][r];
    y[static_cast<int64_t>(t0 + tok) * p.h + r0 + r] = device::from_float<T>(v);
  }
}

// ---------------------------------------------------------------------------------------------
// Tiled path (many pairs per expert): grouped GEMMs with the pairs of one kept expert as M (kTileM per
// tile), weight rows as N (kTileN per tile) and k through a kTiledStages-deep cp.async ring of padded
// shared tiles (ldmatrix, mma.sync). 4 warps as 2 (M) x 2 (N): a warp owns 32 pairs x 64 weight rows.
//   gate_up: A = x rows gathered by token, B = 64 gate rows r0.. and the same 64 up rows (f + r0..);
//            a warp's 64 B rows are 32 gate + the matching 32 up rows, so SiLU(gate) * up is local.
//   down:    A = act rows (contiguous positions), B = 128 rows of W2[e]; the epilogue writes each
//            pair's float32 row to pair_out[pair] (pair = t * K + k).
// combine:   y[t] = sum_k weights[t, k] * pair_out[t * K + k] in slot order (dropped slots: weight 0,
//            never read). No atomics: deterministic.
// Work: items (kept slot, N tile, M tile), M tile fastest so CTAs running together share a weight
// tile through L2; a persistent grid walks them, each CTA rebuilding the slot -> first tile table.
constexpr int kTileM = 64, kTileN = 128, kTileK = 64, kTiledStages = 4, kTiledWarps = 4;
constexpr int kTiledCtasPerSm = 2;
constexpr int kTiledStride = kTileK + 8;  // padded shared row (elements): conflict-free ldmatrix
constexpr int kTiledSmemBytes = kTiledStages * (kTileM + kTileN) * kTiledStride * 2;

enum class Gemm { kGateUp, kDown };

// Slot lookups. kept_experts == nullptr is the dense case (the shared expert): one slot, expert 0,
// holding every token once, in order (K = 1).
__device__ __forceinline__ int slot_count(const MoeParams& p, int j) { return p.kept_experts ? p.expert_counts[j] : p.T; }
__device__ __forceinline__ int slot_expert(const MoeParams& p, int j) { return p.kept_experts ? p.kept_experts[j] : 0; }
__device__ __forceinline__ int slot_offset(const MoeParams& p, int j) { return p.kept_experts ? p.expert_offsets[j] : 0; }
__device__ __forceinline__ int pair_at(const MoeParams& p, int pos) { return p.kept_experts ? p.sorted_pairs[pos] : pos; }

struct TileTable {
  int start[kMaxExperts + 1];  // first M tile of kept slot j (exclusive scan of ceil(count / kTileM))
  int tot[33];
};

// Every thread calls; returns the number of M tiles. s.start is complete on return.
__device__ __forceinline__ int build_tile_table(const MoeParams& p, TileTable& s) {
  constexpr int kPer = (kMaxExperts + kTiledWarps * 32 - 1) / (kTiledWarps * 32);
  int n[kPer], sum = 0;
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int j = threadIdx.x * kPer + q;
    n[q] = j < p.num_kept ? (max(slot_count(p, j), 0) + kTileM - 1) / kTileM : 0;
    sum += n[q];
  }
  int total;
  int at = device::block_exclusive_scan(sum, s.tot, &total);
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int j = threadIdx.x * kPer + q;
    if (j < p.num_kept) s.start[j] = at;
    at += n[q];
  }
  if (threadIdx.x == 0) s.start[p.num_kept] = total;
  __syncthreads();
  return total;
}

template <typename T, Gemm G>
__global__ void __launch_bounds__(kTiledWarps * 32, kTiledCtasPerSm) tiled_kernel(const MoeParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);                  // [stages][kTileM][kTiledStride]
  T* sB = sA + kTiledStages * kTileM * kTiledStride;       // [stages][kTileN][kTiledStride]
  __shared__ TileTable table;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
  const int g = lane >> 2, c = lane & 3;
  const int m_tiles = build_tile_table(p, table);
  const int n_tiles = G == Gemm::kGateUp ? p.f / 64 : (p.h + kTileN - 1) / kTileN;
  const int k_tiles = (G == Gemm::kGateUp ? p.h : p.f) / kTileK;
  const int items = m_tiles * n_tiles;
  const int v8 = tid & 7, r = tid >> 3;  // this thread's 16-byte column and first row of every load

  for (int item = blockIdx.x; item < items; item += gridDim.x) {
    int lo = 0, hi = p.num_kept;  // the kept slot: start[lo] * n_tiles <= item < start[lo + 1] * n_tiles
    while (hi - lo > 1) {
      const int mid = (lo + hi) >> 1;
      if (table.start[mid] * n_tiles <= item) lo = mid; else hi = mid;
    }
    const int j = lo, mt_j = table.start[j + 1] - table.start[j];
    const int local = item - table.start[j] * n_tiles;
    const int nt = local / mt_j, mt = local % mt_j;
    const int e = slot_expert(p, j);
    const int pos0 = slot_offset(p, j) + mt * kTileM;
    const int rows = min(kTileM, slot_count(p, j) - mt * kTileM);

    const T* a_src[kTileM / 16];
    bool a_ok[kTileM / 16];
#pragma unroll
    for (int i = 0; i < kTileM / 16; ++i) {
      const int row = r + 16 * i;
      a_ok[i] = row < rows;
      if constexpr (G == Gemm::kGateUp) {
        const int tok = a_ok[i] ? pair_at(p, pos0 + row) / p.K : 0;
        a_src[i] = static_cast<const T*>(p.x) + static_cast<int64_t>(tok) * p.x_stride + v8 * 8;
      } else {
        a_src[i] = static_cast<const T*>(p.act) + static_cast<int64_t>(a_ok[i] ? pos0 + row : 0) * p.f + v8 * 8;
      }
    }
    const T* b_src[kTileN / 16];
    bool b_ok[kTileN / 16];
#pragma unroll
    for (int i = 0; i < kTileN / 16; ++i) {
      const int n = r + 16 * i;
      if constexpr (G == Gemm::kGateUp) {
        const int wrow = n < 64 ? nt * 64 + n : p.f + nt * 64 + n - 64;
        b_ok[i] = true;
        b_src[i] = static_cast<const T*>(p.w13) + (static_cast<int64_t>(e) * 2 * p.f + wrow) * p.h + v8 * 8;
      } else {
        const int hrow = nt * kTileN + n;
        b_ok[i] = hrow < p.h;
        b_src[i] = static_cast<const T*>(p.w2) + (static_cast<int64_t>(e) * p.h + (b_ok[i] ? hrow : 0)) * p.f + v8 * 8;
      }
    }
    auto load_stage = [&](int kt, int stage) {
      const int k0 = kt * kTileK;
      T* a = sA + stage * kTileM * kTiledStride + v8 * 8;
      T* b = sB + stage * kTileN * kTiledStride + v8 * 8;
#pragma unroll
      for (int i = 0; i < kTileM / 16; ++i) device::cp_async16(a + (r + 16 * i) * kTiledStride, a_src[i] + k0, a_ok[i]);
#pragma unroll
      for (int i = 0; i < kTileN / 16; ++i) device::cp_async16(b + (r + 16 * i) * kTiledStride, b_src[i] + k0, b_ok[i]);
    };

    float acc[2][8][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) acc[mi][nb][0] = acc[mi][nb][1] = acc[mi][nb][2] = acc[mi][nb][3] = 0.f;
#pragma unroll
    for (int st = 0; st < kTiledStages - 1; ++st) {
      if (st < k_tiles) load_stage(st, st);
      device::cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      device::cp_async_wait<kTiledStages - 2>();  // stage kt has landed (this thread's copies) ...
      __syncthreads();                            // ... everyone's; and stage kt - 1 is consumed
      {
        const int next = kt + kTiledStages - 1;
        if (next < k_tiles) load_stage(next, next % kTiledStages);
        device::cp_async_commit();
      }
      const T* a = sA + (kt % kTiledStages) * kTileM * kTiledStride;
      const T* b = sB + (kt % kTiledStages) * kTileN * kTiledStride;
#pragma unroll
      for (int kk = 0; kk < kTileK / 16; ++kk) {
        uint32_t af[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const int row = wm * 32 + mi * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
          device::ldmatrix_x4(af[mi], a + row * kTiledStride + kk * 16 + (lane >> 4) * 8);
        }
#pragma unroll
        for (int nb2 = 0; nb2 < 4; ++nb2) {
          const int base = G == Gemm::kGateUp ? (nb2 >> 1) * 64 + wn * 32 + (nb2 & 1) * 16 : wn * 64 + nb2 * 16;
          const int row = base + (lane >> 4) * 8 + (lane & 7);
          uint32_t bf[4];
          device::ldmatrix_x4(bf, b + row * kTiledStride + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            Mma<T>::run(acc[mi][2 * nb2], af[mi], bf[0], bf[1]);
            Mma<T>::run(acc[mi][2 * nb2 + 1], af[mi], bf[2], bf[3]);
          }
        }
      }
    }
    device::cp_async_wait<0>();
    __syncthreads();  // every warp is done with the ring before the next item refills it

#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = wm * 32 + mi * 16 + half * 8 + g;
        if (row >= rows) continue;
        const int pos = pos0 + row;
        if constexpr (G == Gemm::kGateUp) {
          T* dst = static_cast<T*>(p.act) + static_cast<int64_t>(pos) * p.f + nt * 64 + wn * 32 + 2 * c;
#pragma unroll
          for (int nb = 0; nb < 4; ++nb) {
            const float v0 = silu(acc[mi][nb][2 * half]) * acc[mi][nb + 4][2 * half];
            const float v1 = silu(acc[mi][nb][2 * half + 1]) * acc[mi][nb + 4][2 * half + 1];
            *reinterpret_cast<uint32_t*>(dst + nb * 8) = Mma<T>::pack(v0, v1);
          }
        } else {
          const int pair = pair_at(p, pos);
          float* dst = p.pair_out + static_cast<int64_t>(pair) * p.h;
#pragma unroll
          for (int nb = 0; nb < 8; ++nb) {
            const int col = nt * kTileN + wn * 64 + nb * 8 + 2 * c;
            if (col < p.h)
              *reinterpret_cast<float2*>(dst + col) = make_float2(acc[mi][nb][2 * half], acc[mi][nb][2 * half + 1]);
          }
        }
      }
  }
}

// y[t, 4i .. 4i+3] = sum_k weights[t, k] * pair_out[t * K + k, 4i ..] (+ shared.weight[t] *
// shared.out[t, 4i ..]); grid (T, h / 4 / 128 rounded up).
template <typename T>
__global__ void __launch_bounds__(128) combine_kernel(const MoeParams p) {
  const int t = blockIdx.x, col = (blockIdx.y * blockDim.x + threadIdx.x) * 4;
  if (col >= p.h) return;
  float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int k = 0; k < p.K; ++k) {
    const float w = p.weights[static_cast<int64_t>(t) * p.K + k];
    if (w == 0.f) continue;  // dropped slot: its row was never written
    const float4 v = *reinterpret_cast<const float4*>(p.pair_out + (static_cast<int64_t>(t) * p.K + k) * p.h + col);
    s.x += w * v.x;
    s.y += w * v.y;
    s.z += w * v.z;
    s.w += w * v.w;
  }
  if (p.shared.out != nullptr) {
    const float w = p.shared.weight[t];
    const float4 v = *reinterpret_cast<const float4*>(p.shared.out + static_cast<int64_t>(t) * p.h + col);
    s.x += w * v.x;
    s.y += w * v.y;
    s.z += w * v.z;
    s.w += w * v.w;
  }
  uint2 out;
  out.x = Mma<T>::pack(s.x, s.y);
  out.y = Mma<T>::pack(s.z, s.w);
  *reinterpret_cast<uint2*>(static_cast<T*>(p.y) + static_cast<int64_t>(t) * p.h + col) = out;
}

template <typename T, Gemm G>
cudaError_t launch_tiled_gemm(const MoeParams& p, int n_tiles, cudaStream_t stream) {
  auto* kernel = tiled_kernel<T, G>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kTiledSmemBytes);
  if (err != cudaSuccess) return err;
  // M tiles <= pairs / kTileM + one partial tile per slot with pairs (<= min(Bk, pairs) of them); a
  // tight bound keeps small calls on one CTA per SM
  const int64_t pairs = static_cast<int64_t>(p.T) * p.K;
  const int64_t max_items = (pairs / kTileM + std::min<int64_t>(p.num_kept, pairs)) * n_tiles;
  const int grid = static_cast<int>(max(int64_t(1), min(max_items, int64_t(p.num_sms) * kTiledCtasPerSm)));
  kernel<<<grid, kTiledWarps * 32, kTiledSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_tiled(const MoeParams& p, cudaStream_t stream) {
  if (p.pair_out == nullptr) return cudaErrorInvalidValue;
  cudaError_t err;
  if (p.shared.w13 != nullptr) {  // the shared expert: dense slot, K = 1, its own FFN size and scratch
    MoeParams s = p;
    s.w13 = p.shared.w13;
    s.w2 = p.shared.w2;
    s.act = p.shared.act;
    s.pair_out = p.shared.out;
    s.f = p.shared.fs;
    s.E = s.K = s.num_kept = 1;
    s.kept_experts = s.expert_counts = s.expert_offsets = s.sorted_pairs = nullptr;
    if ((err = launch_tiled_gemm<T, Gemm::kGateUp>(s, s.f / 64, stream)) != cudaSuccess) return err;
    if ((err = launch_tiled_gemm<T, Gemm::kDown>(s, (s.h + kTileN - 1) / kTileN, stream)) != cudaSuccess) return err;
  }
  err = launch_tiled_gemm<T, Gemm::kGateUp>(p, p.f / 64, stream);
  if (err != cudaSuccess) return err;
  err = launch_tiled_gemm<T, Gemm::kDown>(p, (p.h + kTileN - 1) / kTileN, stream);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.T, (p.h / 4 + 127) / 128);
  combine_kernel<T><<<grid, 128, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const MoeParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  if (resolve_path(p) == Path::kTiled) return launch_tiled<T>(p, stream);
  const int max_items = p.num_kept * (p.f / kRowTile);
  const int grid1 = max(1, min(max_items, p.num_sms * kGateUpCtasPerSm));
  gate_up_kernel<T><<<grid1, kGateUpWarps * 32, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const size_t smem = sizeof(DownSmem);
  err = cudaFuncSetAttribute(down_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid2(p.h / kRowTile, (p.T + kTokenTile - 1) / kTokenTile);
  down_kernel<T><<<grid2, kDownWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace fused_moe
}  // namespace specmoe
