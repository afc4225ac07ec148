// SPECMOE_HD: a function compiled for both the host (CPU ops, tests) and the device (CUDA kernels), so that
// the CPU implementation and the kernels share one copy of their arithmetic rules. Torch-free.
#pragma once

#if defined(__CUDACC__)
#define SPECMOE_HD __host__ __device__ __forceinline__
#else
#define SPECMOE_HD inline
#endif
