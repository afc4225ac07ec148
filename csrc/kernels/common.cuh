// Device utilities shared by the kernel families (torch-free).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace specmoe {
namespace device {

constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// torch builds with __CUDA_NO_{HALF,BFLOAT16}_CONVERSIONS__: convert through intrinsics.
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// Warp-wide reductions (every lane of a full warp calls; every lane gets the result). V: int, float,
// uint64_t (any type __shfl_*_sync moves).
template <typename V>
__device__ __forceinline__ V warp_inclusive_scan(V v) {  // inclusive prefix sum over the lanes
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const V u = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v += u;
  }
  return v;
}
template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
template <typename V>
__device__ __forceinline__ V warp_max(V v) {  // float: fmaxf, so a NaN lane does not win
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const V u = __shfl_xor_sync(kFull, v, o);
    if constexpr (std::is_same_v<V, float>) v = fmaxf(v, u); else v = u > v ? u : v;
  }
  return v;
}

// Block-wide exclusive prefix sum of one int per thread (every thread must call; <= 1024 threads).
// `tot` is a 33-int shared scratch; returns the thread's exclusive prefix, *total gets the sum.
__device__ __forceinline__ int block_exclusive_scan(int v, int* tot, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  const int incl = warp_inclusive_scan(v);
  if (lane == 31) tot[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int w = lane < nwarps ? tot[lane] : 0;
    const int wi = warp_inclusive_scan(w);
    tot[lane] = wi - w;
    if (lane == 31) tot[32] = wi;
  }
  __syncthreads();
  const int r = incl - v + tot[warp];
  *total = tot[32];
  __syncthreads();  // tot may be reused right away
  return r;
}

}  // namespace device
}  // namespace specmoe
