// KV compaction kernels (contract and algorithm: kv_compact.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kv_compact.h"

namespace specmoe {
namespace kv_compact {
namespace detail {

constexpr int kThreads = 256;

template <int kVec> struct VecType;
template <> struct VecType<16> { using type = uint4; };
template <> struct VecType<8> { using type = uint2; };
template <> struct VecType<4> { using type = uint32_t; };
template <> struct VecType<2> { using type = uint16_t; };
template <> struct VecType<1> { using type = uint8_t; };

template <int kVec>
__global__ void __launch_bounds__(kThreads) move_kernel(KvCompactParams p) {
  using Vec = typename VecType<kVec>::type;
  __shared__ Vec stage[kStageBytes / kVec];
  const int b = blockIdx.x, t = blockIdx.y;
  int64_t n = p.n_accepted[b];
  n = n < 0 ? 0 : (n > p.P - 1 ? p.P - 1 : n);
  if (n == 0) return;
  const int64_t len = p.lengths[b];
  const int64_t* path = p.path + int64_t(b) * p.P;
  const int vpr = p.row_bytes / kVec;                 // vectors per row
  const int64_t units = n * p.Hk;                     // (head, j) rows, head-major, j ascending
  const int64_t per_stage = kStageBytes / p.row_bytes;
  Vec* req = reinterpret_cast<Vec*>(static_cast<char*>(p.tensors[t]) + int64_t(b) * p.Hk * p.S * p.row_bytes);
  for (int64_t u0 = 0; u0 < units; u0 += per_stage) {
    const int rows = int(units - u0 < per_stage ? units - u0 : per_stage);
    const int total = rows * vpr;
#pragma unroll 1
    for (int phase = 0; phase < 2; ++phase) {
      for (int i = threadIdx.x; i < total; i += kThreads) {
        const int r = i / vpr, c = i - r * vpr;
        const int64_t u = u0 + r, h = u / n, j = u - h * n + 1, pj = path[j];
        const int64_t src = len + pj, dst = len + j;
        if (pj < 1 || src == dst || src < 0 || src >= p.S || dst < 0 || dst >= p.S) continue;
        Vec* head = req + h * p.S * vpr;
        if (phase == 0)
          stage[i] = head[src * vpr + c];
        else
          head[dst * vpr + c] = stage[i];
      }
      __syncthreads();
    }
  }
}

__global__ void commit_kernel(KvCompactParams p) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= p.bs) return;
  int64_t n = p.n_accepted[b];
  n = n < 0 ? 0 : (n > p.P - 1 ? p.P - 1 : n);
  const int64_t v = p.lengths[b] + n + 1;
  p.lengths[b] = v > p.S ? p.S : v;
}

template <int kVec>
cudaError_t launch_vec(const KvCompactParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(p.bs), unsigned(p.num_tensors));
  move_kernel<kVec><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace kv_compact
}  // namespace specmoe
