// Tree acceptance kernels (contract, rules and algorithm: tree_accept.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "tree_accept.h"

namespace specmoe {
namespace tree_accept {
namespace detail {

namespace cg = cooperative_groups;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxSegments = kMaxVocab / kSegment;
constexpr unsigned kFull = 0xffffffffu;

// 8 consecutive vocabulary elements of one lane: float value, key, in range.
struct Chunk {
  float v[8];
  uint32_t k[8];
  bool ok[8];
};

template <typename T> struct Traits;
template <> struct Traits<__nv_bfloat16> {
  __device__ static void one(const __nv_bfloat16* row, int i, float* v, uint32_t* k) {
    const uint16_t b = reinterpret_cast<const uint16_t*>(row)[i];
    *k = key_bf16(b);
    *v = __uint_as_float(uint32_t(b) << 16);
  }
  __device__ static void vec(const __nv_bfloat16* row, int i, Chunk& c) {
    const uint4 q = *reinterpret_cast<const uint4*>(row + i);
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint16_t b = uint16_t(w[j >> 1] >> (16 * (j & 1)));
      c.k[j] = key_bf16(b);
      c.v[j] = __uint_as_float(uint32_t(b) << 16);
    }
  }
};
template <> struct Traits<__half> {
  __device__ static void one(const __half* row, int i, float* v, uint32_t* k) {
    const uint16_t b = reinterpret_cast<const uint16_t*>(row)[i];
    *k = key_f16(b);
    *v = __half2float(__ushort_as_half(b));
  }
  __device__ static void vec(const __half* row, int i, Chunk& c) {
    const uint4 q = *reinterpret_cast<const uint4*>(row + i);
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint16_t b = uint16_t(w[j >> 1] >> (16 * (j & 1)));
      c.k[j] = key_f16(b);
      c.v[j] = __half2float(__ushort_as_half(b));
    }
  }
};
template <> struct Traits<float> {
  __device__ static void one(const float* row, int i, float* v, uint32_t* k) {
    const float x = row[i];
    *k = key_f32(__float_as_uint(x));
    *v = x;
  }
  __device__ static void vec(const float* row, int i, Chunk& c) {
    const float4 a = *reinterpret_cast<const float4*>(row + i);
    const float4 b = *reinterpret_cast<const float4*>(row + i + 4);
    const float x[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      c.k[j] = key_f32(__float_as_uint(x[j]));
      c.v[j] = x[j];
    }
  }
};

// Elements [base, base + 8) of the row.
template <typename T, bool kVec>
__device__ __forceinline__ void load_chunk(const T* row, int V, int base, Chunk& c) {
  if (kVec && base + 8 <= V) {
    Traits<T>::vec(row, base, c);
#pragma unroll
    for (int j = 0; j < 8; ++j) c.ok[j] = true;
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    c.ok[j] = base + j < V;
    c.v[j] = 0.0f;
    c.k[j] = 0u;
    if (c.ok[j]) Traits<T>::one(row, base + j, &c.v[j], &c.k[j]);
  }
}


struct Shared {
  uint64_t hist[256];           // digit histogram (counts or masses) of this CTA's vocabulary slice
  uint64_t seg[kMaxSegments];   // mass of each local 256-element segment (draw pass)
  uint64_t red[kWarps];
  uint64_t best;                // this CTA's packed argmax
  uint64_t slice_mass;          // this CTA's kept mass (draw pass)
  uint32_t prefix;              // radix select state: key prefix found so far
  uint64_t above;               // count / mass of keys above the prefix's bin
  uint64_t total;               // first-digit total (Wk in mass mode)
};

// A node's vocabulary is split over a cluster of G CTAs (G = 1: one CTA). Every CTA combines the G
// histograms / partial results itself (fixed order, integers) and so reaches the same decisions.
template <int G> struct Cluster {
  __device__ static void sync() {
    if constexpr (G > 1)
      cg::this_cluster().sync();
    else
      __syncthreads();
  }
  __device__ static int rank() {
    if constexpr (G > 1)
      return int(cg::this_cluster().block_rank());
    else
      return 0;
  }
  template <typename X> __device__ static const X* at(const X* ptr, int r) {
    if constexpr (G > 1)
      return cg::this_cluster().map_shared_rank(const_cast<X*>(ptr), r);
    else
      return ptr;
  }
};

// Segments [s_lo, s_hi) of the row belong to this CTA.
struct Slice {
  int s_lo, s_hi;
};

template <int G> __device__ __forceinline__ uint64_t hist_sum(const Shared& sh, int bin) {
  uint64_t v = 0;
#pragma unroll
  for (int r = 0; r < G; ++r) v += Cluster<G>::at(sh.hist, r)[bin];
  return v;
}

// Radix select, descending: the largest key v (among participating elements) such that the weight of
// participating elements with key >= v reaches thr. kMass: weight = w(x) and participation needs
// key >= min_key; else weight 1 for all elements. Returns v; *total = participating weight (first pass).
template <typename T, bool kVec, bool kMass, int G>
__device__ uint32_t radix_select(const T* row, int V, Slice sl, int ndigits, double thr, bool thr_is_fraction,
                                 uint32_t min_key, float m, float scale, uint64_t* total_out, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // every thread has read the previous select's results
  if (threadIdx.x == 0) {
    sh.prefix = 0u;
    sh.above = 0;
  }
  for (int d = 0; d < ndigits; ++d) {
    const int shift = 24 - 8 * d;
    const uint32_t pmask = d == 0 ? 0u : (0xffffffffu << (shift + 8));
    for (int i = threadIdx.x; i < 256; i += kThreads) sh.hist[i] = 0;
    __syncthreads();
    const uint32_t prefix = sh.prefix;
    for (int s = sl.s_lo + warp; s < sl.s_hi; s += kWarps) {
      Chunk c;
      load_chunk<T, kVec>(row, V, s * kSegment + lane * 8, c);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        bool part = c.ok[j] && (c.k[j] & pmask) == prefix;
        if (kMass) part = part && c.k[j] >= min_key;
        const uint32_t bin = part ? ((c.k[j] >> shift) & 255u) : 256u;
        const unsigned grp = __match_any_sync(kFull, bin);
        const bool leader = lane == __ffs(grp) - 1;
        if (kMass) {
          const uint64_t w = part ? fixed_weight(c.v[j], m, scale) : 0;
          const uint32_t lo = __reduce_add_sync(grp, uint32_t(w & 0xffffu));
          const uint32_t hi = __reduce_add_sync(grp, uint32_t(w >> 16));
          const uint64_t sum = uint64_t(lo) + (uint64_t(hi) << 16);
          if (part && leader && sum != 0)
            atomicAdd(reinterpret_cast<unsigned long long*>(&sh.hist[bin]), (unsigned long long)sum);
        } else if (part && leader) {
          atomicAdd(reinterpret_cast<unsigned long long*>(&sh.hist[bin]), (unsigned long long)__popc(grp));
        }
      }
    }
    Cluster<G>::sync();  // every slice's histogram is complete
    if (warp == 0) {
      // lane l owns bins 255 - 8l .. 248 - 8l (descending), summed over the cluster
      uint64_t h8[8];
      uint64_t mine = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        h8[j] = hist_sum<G>(sh, 255 - 8 * lane - j);
        mine += h8[j];
      }
      const uint64_t incl = device::warp_inclusive_scan(mine);
      if (d == 0) {
        const uint64_t tot = __shfl_sync(kFull, incl, 31);
        if (lane == 0) sh.total = tot;
        if (thr_is_fraction) thr = thr * double(tot);
      }
      const uint64_t above = sh.above;
      __syncwarp();  // every lane has read sh.above before lane `who` overwrites it below
      const unsigned hit = __ballot_sync(kFull, double(above + incl) >= thr);
      // hit != 0 whenever thr <= total; otherwise take the lowest bin (every participant kept)
      const int who = hit ? __ffs(hit) - 1 : 31;
      if (lane == who) {
        uint64_t acc = above + incl - mine;  // weight of the bins above this lane's
        int bin = 248 - 8 * lane;            // lowest own bin when nothing reaches thr
        bool found = false;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (!found) {
            if (double(acc + h8[j]) >= thr) {
              bin = 255 - 8 * lane - j;
              found = true;
            } else {
              acc += h8[j];
            }
          }
        }
        sh.prefix = sh.prefix | (uint32_t(bin) << shift);
        sh.above = acc;
      }
    }
    Cluster<G>::sync();  // nobody reads a histogram any more; sh.prefix is visible
  }
  *total_out = sh.total;
  return sh.prefix;
}

template <typename T, bool kVec, int G>
__global__ void __launch_bounds__(kThreads) node_kernel(TreeAcceptParams p) {
  __shared__ Shared sh;
  const int node = blockIdx.x / G, b = blockIdx.y, rank = Cluster<G>::rank();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nid = int64_t(b) * p.T + node;
  if (node > 0 && !p.valid[nid]) {  // the whole cluster leaves together
    if (threadIdx.x == 0 && rank == 0) p.node_token[nid] = -1;
    return;
  }
  const T* row = static_cast<const T*>(p.logits) + nid * int64_t(p.V);
  const int V = p.V;
  const int nseg = (V + kSegment - 1) / kSegment;
  const int per_rank = (nseg + G - 1) / G;
  const Slice sl{min(rank * per_rank, nseg), min((rank + 1) * per_rank, nseg)};

  // pass 0: argmax as the max of (key << 32 | ~index)
  uint64_t best = 0;
  for (int s = sl.s_lo + warp; s < sl.s_hi; s += kWarps) {
    Chunk c;
    const int base = s * kSegment + lane * 8;
    load_chunk<T, kVec>(row, V, base, c);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint64_t pk = (uint64_t(c.k[j]) << 32) | uint64_t(0xffffffffu - uint32_t(base + j));
      if (c.ok[j] && pk > best) best = pk;
    }
  }
  best = device::warp_max(best);
  if (lane == 0) sh.red[warp] = best;
  __syncthreads();
  if (warp == 0) {
    uint64_t v = lane < kWarps ? sh.red[lane] : 0;
    v = device::warp_max(v);
    if (lane == 0) sh.best = v;
  }
  Cluster<G>::sync();
  best = 0;
#pragma unroll
  for (int r = 0; r < G; ++r) {
    const uint64_t v = *Cluster<G>::at(&sh.best, r);
    best = v > best ? v : best;
  }
  const int amax = int(0xffffffffu - uint32_t(best));
  if (p.greedy) {
    if (G > 1) Cluster<G>::sync();  // remote reads done before any CTA exits
    if (threadIdx.x == 0 && rank == 0) p.node_token[nid] = amax;
    return;
  }
  float m;
  {
    float v;
    uint32_t k;
    Traits<T>::one(row, amax, &v, &k);
    m = v != v ? -INFINITY : v;
  }
  const float scale = p.scale;
  const int ndigits = sizeof(T) == 2 ? 2 : 4;

  uint32_t kept = 0u;  // final threshold key
  if (p.top_k > 0 && p.top_k < V) {
    uint64_t tot;
    kept = radix_select<T, kVec, false, G>(row, V, sl, ndigits, double(p.top_k), false, 0u, m, scale, &tot, sh);
  }
  if (p.top_p < 1.0) {
    uint64_t wk;
    const uint32_t kp =
        radix_select<T, kVec, true, G>(row, V, sl, ndigits, p.top_p, true, kept, m, scale, &wk, sh);
    if (wk > 0 && kp > kept) kept = kp;
  }

  // draw pass: masses of the local 256-element segments of the kept set
  for (int s = sl.s_lo + warp; s < sl.s_hi; s += kWarps) {
    Chunk c;
    load_chunk<T, kVec>(row, V, s * kSegment + lane * 8, c);
    uint64_t w = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (c.ok[j] && c.k[j] >= kept) w += fixed_weight(c.v[j], m, scale);
    w = device::warp_sum(w);
    if (lane == 0) sh.seg[s - sl.s_lo] = w;
  }
  __syncthreads();
  const int nloc = sl.s_hi - sl.s_lo;
  const int per = (nloc + 31) / 32;
  const int s0 = min(lane * per, nloc), s1 = min(s0 + per, nloc);
  uint64_t mine = 0, incl = 0;
  if (warp == 0) {
    for (int s = s0; s < s1; ++s) mine += sh.seg[s];
    incl = device::warp_inclusive_scan(mine);
    if (lane == 31) sh.slice_mass = incl;
  }
  Cluster<G>::sync();
  uint64_t W = 0, base_mass = 0;
#pragma unroll
  for (int r = 0; r < G; ++r) {
    const uint64_t v = *Cluster<G>::at(&sh.slice_mass, r);
    W += v;
    if (r < rank) base_mass += v;
  }
  if (G > 1) Cluster<G>::sync();  // remote reads done before any CTA exits
  if (warp != 0) return;
  if (W == 0) {
    if (lane == 0 && rank == 0) p.node_token[nid] = amax;
    return;
  }
  const uint32_t bits = philox::node_bits24(uint64_t(p.seed[b]), uint64_t(p.offset[b]), uint32_t(node));
  const uint64_t t = scaled_threshold(bits, W);
  if (t < base_mass || t >= base_mass + __shfl_sync(kFull, incl, 31)) return;  // another slice draws
  incl += base_mass;
  const unsigned hit = __ballot_sync(kFull, incl > t);
  const int who = __ffs(hit) - 1;  // t < this slice's end: some lane hits
  int seg = 0;
  uint64_t before = 0;
  if (lane == who) {
    before = incl - mine;
    for (seg = s0; seg < s1; ++seg) {
      if (before + sh.seg[seg] > t) break;
      before += sh.seg[seg];
    }
  }
  seg = __shfl_sync(kFull, seg, who) + sl.s_lo;
  before = __shfl_sync(kFull, before, who);
  Chunk c;
  const int base = seg * kSegment + lane * 8;
  load_chunk<T, kVec>(row, V, base, c);
  uint64_t wj[8];
  uint64_t lw = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    wj[j] = (c.ok[j] && c.k[j] >= kept) ? fixed_weight(c.v[j], m, scale) : 0;
    lw += wj[j];
  }
  const uint64_t li = device::warp_inclusive_scan(lw) + before;
  const unsigned h2 = __ballot_sync(kFull, li > t);
  const int w2 = __ffs(h2) - 1;
  if (lane == w2) {
    uint64_t acc = li - lw;
    int y = base + 7;
    for (int j = 0; j < 8; ++j) {
      acc += wj[j];
      if (acc > t) {
        y = base + j;
        break;
      }
    }
    p.node_token[nid] = y;
  }
}

// One warp per request: the acceptance walk over the tree in shared memory.
__global__ void __launch_bounds__(32) walk_kernel(TreeAcceptParams p) {
  __shared__ int32_t par[kMaxNodes];
  __shared__ int64_t tok[kMaxNodes];
  __shared__ uint8_t ok[kMaxNodes];
  __shared__ int16_t dep[kMaxNodes];
  const int b = blockIdx.x, lane = threadIdx.x, T = p.T;
  const int64_t* tokens = p.tokens + int64_t(b) * T;
  const int64_t* parent = p.parent + int64_t(b) * T;
  const bool* valid = p.valid + int64_t(b) * T;
  const int32_t* y = p.node_token + int64_t(b) * T;
  int64_t* path = p.path + int64_t(b) * T;
  for (int i = lane; i < T; i += 32) {
    const int64_t pi = parent[i];
    // a parent outside [0, i) makes the node unreachable (never a device fault)
    par[i] = (i > 0 && pi >= 0 && pi < i) ? int32_t(pi) : -1;
    tok[i] = tokens[i];
    ok[i] = i == 0 || (valid[i] && par[i] >= 0);
    path[i] = -1;
  }
  __syncwarp();
  if (p.greedy) {
    for (int i = lane + 1; i < T; i += 32)
      if (ok[i]) ok[i] = tok[i] == int64_t(y[par[i]]);
    __syncwarp();
    if (lane == 0) {
      int best = 0, bestd = 0;
      dep[0] = 0;
      for (int i = 1; i < T; ++i) {
        const int q = par[i];
        const bool on = ok[i] && ok[q];  // ok[q] now means "q accepted"
        ok[i] = on;
        if (on) {
          dep[i] = int16_t(dep[q] + 1);
          if (dep[i] > bestd) {
            bestd = dep[i];
            best = i;
          }
        }
      }
      for (int j = bestd, v = best; j >= 0; --j, v = par[v]) path[j] = v;
      p.n_accepted[b] = bestd;
      p.bonus[b] = y[best];
      p.offset[b] += 1;
    }
    return;
  }
  int cur = 0, n = 0;
  if (lane == 0) path[0] = 0;
  while (true) {
    const int64_t yc = y[cur];
    int child = -1;
    for (int i0 = cur + 1; i0 < T && child < 0; i0 += 32) {
      const int i = i0 + lane;
      const bool match = i < T && ok[i] && par[i] == cur && tok[i] == yc;
      const unsigned hit = __ballot_sync(kFull, match);
      if (hit) child = i0 + __ffs(hit) - 1;
    }
    if (child < 0) {
      if (lane == 0) {
        p.n_accepted[b] = n;
        p.bonus[b] = yc;
        p.offset[b] += 1;
      }
      return;
    }
    ++n;
    cur = child;
    if (lane == 0) path[n] = child;
  }
}

template <typename T, bool kVec, int G>
cudaError_t launch_nodes(const TreeAcceptParams& p, cudaStream_t stream) {
  if constexpr (G == 1) {
    node_kernel<T, kVec, 1><<<dim3(unsigned(p.T), unsigned(p.bs)), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  } else {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(unsigned(p.T * G), unsigned(p.bs));
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = 0;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = G;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, node_kernel<T, kVec, G>, p);
  }
}

template <typename T, bool kVec>
cudaError_t launch_nodes_g(const TreeAcceptParams& p, int G, cudaStream_t stream) {
  switch (G) {
    case 8: return launch_nodes<T, kVec, 8>(p, stream);
    case 4: return launch_nodes<T, kVec, 4>(p, stream);
    case 2: return launch_nodes<T, kVec, 2>(p, stream);
    default: return launch_nodes<T, kVec, 1>(p, stream);
  }
}

// CTAs per node: the largest of 8, 4, 2, 1 that keeps bs * T * G within about two CTAs per SM (and
// at least one 256-element segment per CTA), unless p.cluster asks for one.
inline int cluster_size(const TreeAcceptParams& p) {
  const int nseg = (p.V + kSegment - 1) / kSegment;
  int G = p.cluster;
  if (G != 1 && G != 2 && G != 4 && G != 8) {
    const int64_t nodes = int64_t(p.bs) * p.T, slots = 2 * int64_t(p.num_sms > 0 ? p.num_sms : 132);
    G = 8;
    while (G > 1 && nodes * G > slots) G /= 2;
  }
  while (G > 1 && G > nseg) G /= 2;
  return G;
}

template <typename T>
cudaError_t launch_typed(const TreeAcceptParams& p, cudaStream_t stream) {
  const int G = cluster_size(p);
  cudaError_t err = p.vec_loads ? launch_nodes_g<T, true>(p, G, stream) : launch_nodes_g<T, false>(p, G, stream);
  if (err != cudaSuccess) return err;
  walk_kernel<<<unsigned(p.bs), 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace tree_accept
}  // namespace specmoe
