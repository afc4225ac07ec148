// Host-side device queries shared by the CUDA adapters (cached per device: launch paths stay cheap).
#pragma once

#include <cuda_runtime_api.h>

namespace specmoe {

// Streaming multiprocessors of `device` (132 on an H100 SXM; the fallback if the query fails).
inline int multiprocessor_count(int device) {
  static int cache[64] = {};
  if (device < 0 || device >= 64) return 132;
  if (cache[device] == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    cache[device] = n > 0 ? n : 132;
  }
  return cache[device];
}

}  // namespace specmoe
