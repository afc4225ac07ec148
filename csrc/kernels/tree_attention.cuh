// Tree attention kernels (see tree_attention.h for shapes and the algorithm).
//
// MMA fragment layouts and the ldmatrix addressing: mma.cuh.
// S = Q K^T: A = Q rows (ldmatrix), B = K rows as stored [key][d] (ldmatrix, no transpose).
// O += P V:  A = P, taken straight from S's C fragments (two n-tiles of S = one k-step of P),
//            B = V [key][d] through ldmatrix.trans.
// Shared rows are padded to d + 8 elements: 8 consecutive rows then start 16 bytes apart modulo
// 128, so every ldmatrix phase touches 32 distinct banks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "common.cuh"
#include "mma.cuh"
#include "tree_attention.h"

namespace specmoe {
namespace tree_attention {
namespace detail {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

using device::cp_async16;
using device::cp_async_commit;
using device::cp_async_wait;
using device::ldmatrix_x4;
using device::ldmatrix_x4_trans;
using device::Mma;

template <int D, int kStages>
struct Smem {
  static constexpr int kStride = D + 8;                                   // padded row (elements)
  static constexpr int kQ = kRowTile * kStride;
  static constexpr int kKV = kKeyChunk * kStride;
  static constexpr int kBytes = (kQ + 2 * kStages * kKV) * 2;
};

// grid (splits, row tiles, bs * Hk), 32 * RG * KG threads. RG row groups of 16 rows x KG key groups.
template <typename T, int D, int kStages, int RG, int KG>
__global__ void __launch_bounds__(32 * RG * KG) tree_attention_kernel(const TreeAttentionParams p) {
  using L = Smem<D, kStages>;
  constexpr int kStride = L::kStride;
  constexpr int kVec = D / 8;                     // 16-byte vectors per row
  constexpr int kThreadsCta = 32 * RG * KG;
  constexpr int RT = 16 * RG;                     // rows of this CTA's tile
  constexpr int KS = kKeyChunk / KG;              // keys of a chunk per warp (16 | 32 | 64)
  constexpr int NT = KS / 8;                      // S n-tiles per warp
  static_assert(KS % 16 == 0, "a warp needs whole 16-key MMA k-steps");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + L::kQ;
  T* sV = sK + kStages * L::kKV;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rg = warp % RG, kg = warp / RG;
  const int g = lane >> 2, c = lane & 3;
  const int split = blockIdx.x, tile = blockIdx.y;
  const int b = blockIdx.z / p.Hk, hk = blockIdx.z % p.Hk;
  const int rep = p.Hq / p.Hk, M = p.T * rep;
  const int row0 = tile * RT;

  const int64_t prefix = p.prefix_lens[b];
  int64_t len = prefix + p.T;
  if (len > p.S) len = p.S;
  if (len < 0) len = 0;
  const int n_chunks = static_cast<int>((len + kKeyChunk - 1) / kKeyChunk);
  const int per = (n_chunks + p.num_splits - 1) / p.num_splits;
  const int c_begin = split * per;
  const int c_end = min(n_chunks, c_begin + per);
  const int group = blockIdx.z * gridDim.y + tile;   // (b, hk, tile)

  const T* kbase = static_cast<const T*>(p.k) + b * p.kv_stride_b + hk * p.kv_stride_h;
  const T* vbase = static_cast<const T*>(p.v) + b * p.kv_stride_b + hk * p.kv_stride_h;

  // This thread's two rows (g, g + 8 of its row group) -> tree node t (for the mask).
  const int mrow0 = row0 + rg * 16 + g, mrow1 = mrow0 + 8;
  const bool warp_active = row0 + rg * 16 < M;

  if (c_begin >= c_end) {   // empty split (short request): contributes nothing to the merge
    if (p.num_splits > 1) {
      for (int r = tid; r < RT; r += kThreadsCta)
        p.partial_lse[(static_cast<int64_t>(group) * p.num_splits + split) * kRowTile + r] = -INFINITY;
    }
    return;
  }

  // Q tile -> shared (rows past M are zero), together with the first KV chunk in one cp.async group.
  for (int i = tid; i < RT * kVec; i += kThreadsCta) {
    const int r = i / kVec, v8 = i % kVec, m = row0 + r;
    const bool ok = m < M;
    const int t = ok ? m / rep : 0, hq = hk * rep + (ok ? m % rep : 0);
    const T* src = static_cast<const T*>(p.q) + b * p.q_stride_b + t * p.q_stride_t + hq * p.q_stride_h + v8 * 8;
    cp_async16(sQ + r * kStride + v8 * 8, src, ok);
  }
  auto load_chunk = [&](int chunk, int stage) {
    T* dk = sK + stage * L::kKV;
    T* dv = sV + stage * L::kKV;
    const int64_t key0 = static_cast<int64_t>(chunk) * kKeyChunk;
    for (int i = tid; i < kKeyChunk * kVec; i += kThreadsCta) {
      const int r = i / kVec, v8 = i % kVec;
      const int64_t key = key0 + r;
      const bool ok = key < len;
      const int64_t off = (ok ? key : 0) * p.kv_stride_s + v8 * 8;
      cp_async16(dk + r * kStride + v8 * 8, kbase + off, ok);
      cp_async16(dv + r * kStride + v8 * 8, vbase + off, ok);
    }
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (c_begin + s < c_end) load_chunk(c_begin + s, s);
    cp_async_commit();
  }

  const float scale2 = p.scale * kLog2e;
  const int W = (p.T + 31) >> 5;
  const int32_t* mask0 = p.tree_mask + (static_cast<int64_t>(b) * p.T + min(mrow0 / rep, p.T - 1)) * W;
  const int32_t* mask1 = p.tree_mask + (static_cast<int64_t>(b) * p.T + min(mrow1 / rep, p.T - 1)) * W;

  uint32_t qa[D / 16][4];
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  for (int chunk = c_begin; chunk < c_end; ++chunk) {
    const int it = chunk - c_begin;
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it == 0 && warp_active) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const int mi = lane >> 3;
        const int r = rg * 16 + (mi & 1) * 8 + (lane & 7), col = kk * 16 + (mi >> 1) * 8;
        ldmatrix_x4(qa[kk], sQ + r * kStride + col);
      }
    }
    {   // prefetch: the stage refilled here was consumed in the previous iteration (all threads passed
        // the barrier above since)
      const int next = chunk + kStages - 1;
      if (next < c_end) load_chunk(next, (it + kStages - 1) % kStages);
      cp_async_commit();
    }
    if (!warp_active) continue;
    const T* k_s = sK + (it % kStages) * L::kKV + kg * KS * kStride;   // this warp's keys
    const T* v_s = sV + (it % kStages) * L::kKV + kg * KS * kStride;

    // S = Q K^T for 16 rows x KS keys.
    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int j2 = 0; j2 < NT / 2; ++j2) {
        const int mi = lane >> 3;
        const int key = j2 * 16 + (mi >> 1) * 8 + (lane & 7), col = kk * 16 + (mi & 1) * 8;
        uint32_t kb[4];
        ldmatrix_x4(kb, k_s + key * kStride + col);
        Mma<T>::run(s[2 * j2], qa[kk], kb[0], kb[1]);
        Mma<T>::run(s[2 * j2 + 1], qa[kk], kb[2], kb[3]);
      }
    }

    // Scale, mask (only chunks reaching past the prefix), online softmax.
    const int64_t key0 = static_cast<int64_t>(chunk) * kKeyChunk + kg * KS;
    const bool masked = key0 + KS > prefix;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float val = s[j][e] * scale2;
        if (masked) {
          const int64_t key = key0 + j * 8 + 2 * c + (e & 1);
          bool vis = key < prefix;
          if (!vis && key < len) {
            const int node = static_cast<int>(key - prefix);
            const int32_t word = (e < 2 ? mask0 : mask1)[node >> 5];
            vis = (word >> (node & 31)) & 1;
          }
          if (!vis) val = -INFINITY;
        }
        s[j][e] = val;
        mx[e >> 1] = fmaxf(mx[e >> 1], val);
      }
    }
    float alpha[2], base[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(device::kFull, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(device::kFull, mx[h], 2));
      const float m_new = fmaxf(m_run[h], mx[h]);
      base[h] = m_new == -INFINITY ? 0.f : m_new;     // a row with nothing visible yet stays at 0
      alpha[h] = exp2f(m_run[h] - base[h]);
      m_run[h] = m_new;
      l_run[h] *= alpha[h];
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp2f(s[j][e] - base[e >> 1]);
        l_run[e >> 1] += s[j][e];
      }
    }
    if (__any_sync(device::kFull, alpha[0] != 1.f || alpha[1] != 1.f)) {   // skipped once the max settles
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][0] *= alpha[0];
        o[n][1] *= alpha[0];
        o[n][2] *= alpha[1];
        o[n][3] *= alpha[1];
      }
    }

    // O += P V.
#pragma unroll
    for (int kk = 0; kk < KS / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int n2 = 0; n2 < D / 16; ++n2) {
        const int mi = lane >> 3;
        const int key = kk * 16 + (mi & 1) * 8 + (lane & 7), col = n2 * 16 + (mi >> 1) * 8;
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, v_s + key * kStride + col);
        Mma<T>::run(o[2 * n2], pa, vb[0], vb[1]);
        Mma<T>::run(o[2 * n2 + 1], pa, vb[2], vb[3]);
      }
    }
  }
  cp_async_wait<0>();

  // The quad shares each row; reduce the partial row sums.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_run[h] += __shfl_xor_sync(device::kFull, l_run[h], 1);
    l_run[h] += __shfl_xor_sync(device::kFull, l_run[h], 2);
  }
  if constexpr (KG > 1) {
    // Merge the key groups: groups 1.. park (m, l, O) in the freed K/V stages, group 0 combines.
    constexpr int kRowF = D + 2;                                  // floats per parked row: O, m, l
    float* park = reinterpret_cast<float*>(sK);
    __syncthreads();                                              // every warp is done with the stages
    if (kg > 0 && warp_active) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float* row = park + ((kg - 1) * RT + rg * 16 + g + 8 * h) * kRowF;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
          *reinterpret_cast<float2*>(row + n * 8 + 2 * c) = make_float2(o[n][2 * h], o[n][2 * h + 1]);
        if (c == 0) {
          row[D] = m_run[h];
          row[D + 1] = l_run[h];
        }
      }
    }
    __syncthreads();
    if (kg > 0 || !warp_active) return;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float m_all = m_run[h];
#pragma unroll
      for (int q = 1; q < KG; ++q)
        m_all = fmaxf(m_all, park[((q - 1) * RT + rg * 16 + g + 8 * h) * kRowF + D]);
      const float bse = m_all == -INFINITY ? 0.f : m_all;
      const float f0 = exp2f(m_run[h] - bse);
      l_run[h] *= f0;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][2 * h] *= f0;
        o[n][2 * h + 1] *= f0;
      }
#pragma unroll
      for (int q = 1; q < KG; ++q) {
        const float* row = park + ((q - 1) * RT + rg * 16 + g + 8 * h) * kRowF;
        const float f = exp2f(row[D] - bse);
        l_run[h] += f * row[D + 1];
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          const float2 v = *reinterpret_cast<const float2*>(row + n * 8 + 2 * c);
          o[n][2 * h] += f * v.x;
          o[n][2 * h + 1] += f * v.y;
        }
      }
      m_run[h] = m_all;
    }
  } else {
    if (!warp_active) return;
  }

  const float inv[2] = {l_run[0] > 0.f ? 1.f / l_run[0] : 0.f, l_run[1] > 0.f ? 1.f / l_run[1] : 0.f};
  const int mrow[2] = {mrow0, mrow1};
  if (p.num_splits == 1) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = mrow[h];
      if (m >= M) continue;
      const int t = m / rep, hq = hk * rep + m % rep;
      T* dst = static_cast<T*>(p.out) + ((static_cast<int64_t>(b) * p.T + t) * p.Hq + hq) * D;
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<uint32_t*>(dst + n * 8 + 2 * c) =
            Mma<T>::pack(o[n][2 * h] * inv[h], o[n][2 * h + 1] * inv[h]);
    }
  } else {
    const int64_t slot = static_cast<int64_t>(group) * p.num_splits + split;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = rg * 16 + g + 8 * h;
      if (row0 + r >= M) continue;
      float* dst = p.partial_out + (slot * kRowTile + r) * D;
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<float2*>(dst + n * 8 + 2 * c) = make_float2(o[n][2 * h] * inv[h], o[n][2 * h + 1] * inv[h]);
      if (c == 0)
        p.partial_lse[slot * kRowTile + r] = l_run[h] > 0.f ? m_run[h] + __log2f(l_run[h]) : -INFINITY;
    }
  }
}

// grid (ceil(groups * RT / 4)), 128 threads: one warp per (group, row); splits merged in order.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) merge_splits_kernel(const TreeAttentionParams p, int tiles, int RT) {
  const int lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t groups = static_cast<int64_t>(p.bs) * p.Hk * tiles;
  if (item >= groups * RT) return;
  const int64_t group = item / RT;
  const int r = static_cast<int>(item % RT);
  const int tile = static_cast<int>(group % tiles);
  const int bh = static_cast<int>(group / tiles);
  const int b = bh / p.Hk, hk = bh % p.Hk;
  const int rep = p.Hq / p.Hk, m = tile * RT + r;
  if (m >= p.T * rep) return;
  const int S = p.num_splits;
  const float* lse = p.partial_lse + group * S * kRowTile + r;
  float mx = -INFINITY;
  for (int s = lane; s < S; s += 32) mx = fmaxf(mx, lse[static_cast<int64_t>(s) * kRowTile]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(device::kFull, mx, o));
  constexpr int kPer = D / 32;   // columns per lane
  float acc[kPer] = {};
  float wsum = 0.f;
  for (int s = 0; s < S; ++s) {
    const float ls = lse[static_cast<int64_t>(s) * kRowTile];
    if (ls == -INFINITY) continue;
    const float w = exp2f(ls - mx);
    wsum += w;
    const float* src = p.partial_out + ((group * S + s) * kRowTile + r) * D + lane * kPer;
    if constexpr (kPer == 4) {
      const float4 v = *reinterpret_cast<const float4*>(src);
      acc[0] += w * v.x; acc[1] += w * v.y; acc[2] += w * v.z; acc[3] += w * v.w;
    } else {
      const float2 v = *reinterpret_cast<const float2*>(src);
      acc[0] += w * v.x; acc[1] += w * v.y;
    }
  }
  const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
  const int t = m / rep, hq = hk * rep + m % rep;
  T* dst = static_cast<T*>(p.out) + ((static_cast<int64_t>(b) * p.T + t) * p.Hq + hq) * D + lane * kPer;
#pragma unroll
  for (int i = 0; i < kPer; i += 2)
    *reinterpret_cast<uint32_t*>(dst + i) = Mma<T>::pack(acc[i] * inv, acc[i + 1] * inv);
}

template <typename T, int D, int RG, int KG>
cudaError_t launch_config(const TreeAttentionParams& p, int tiles, cudaStream_t stream) {
  // 4 stages: three 64-key chunks (96 KB at d = 128) in flight per CTA while one is computed, so the
  // ~130 CTAs of a one-request launch keep enough bytes outstanding to saturate HBM.
  constexpr int kStages = 4;
  using L = Smem<D, kStages>;
  auto kernel = tree_attention_kernel<T, D, kStages, RG, KG>;
  static bool configured[64] = {};   // per instantiation and device (the attribute is per function)
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= 64 || !configured[dev]) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes);
    if (err != cudaSuccess) return err;
    if (dev >= 0 && dev < 64) configured[dev] = true;
  }
  const dim3 grid(p.num_splits, tiles, p.bs * p.Hk);
  kernel<<<grid, 32 * RG * KG, L::kBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_typed(const TreeAttentionParams& p, cudaStream_t stream) {
  const int M = p.T * (p.Hq / p.Hk), RT = tile_rows(M), tiles = row_tiles(p);
  cudaError_t err;
  if (RT == 16) err = launch_config<T, D, 1, 4>(p, tiles, stream);        // decode: 4 warps split the keys
  else if (RT == 32) err = launch_config<T, D, 2, 4>(p, tiles, stream);
  else err = launch_config<T, D, 4, 2>(p, tiles, stream);
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t items = static_cast<int64_t>(p.bs) * p.Hk * tiles * RT;
  merge_splits_kernel<T, D><<<static_cast<unsigned>((items + kWarps - 1) / kWarps), kThreads, 0, stream>>>(p, tiles, RT);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace tree_attention
}  // namespace specmoe
