// Philox4x32-10 counter-based random numbers, identical on the host (CPU op, tests) and the device.
//
// Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC'11). A 128-bit counter and a 64-bit
// key map to four 32-bit words through 10 rounds of multiply-xor; no state, so any (key, counter) can be
// evaluated anywhere, in any order: node i of request b draws from counter (offset_b, i, 0) with key
// seed_b, whichever thread, CTA or backend computes it.
//
//   philox4x32_10(counter[4], key[2]) -> 4 words      (counter word 0 is the least significant)
//   uniform24(word) = (word >> 8) * 2^-24               float in [0, 1), 24 random bits (exact in float32)
//
// Torch-free and header-only: included by the CUDA kernels and by the CPU implementation.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace specmoe {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kW1 = 0xBB67AE85u;  // sqrt(3) - 1

struct Words {
  uint32_t x[4];
};

SPECMOE_HD void mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = uint64_t(a) * uint64_t(b);
  *hi = uint32_t(p >> 32);
  *lo = uint32_t(p);
}

SPECMOE_HD Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, c0, &hi0, &lo0);
    mulhilo(kM1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Words{{c0, c1, c2, c3}};
}

// The 24-bit integer behind a node's uniform: u = bits24 * 2^-24. Key = seed (64 bits), counter =
// (offset low, offset high, node, 0).
SPECMOE_HD uint32_t node_bits24(uint64_t seed, uint64_t offset, uint32_t node) {
  const Words w = philox4x32_10(uint32_t(offset), uint32_t(offset >> 32), node, 0u, uint32_t(seed),
                                uint32_t(seed >> 32));
  return w.x[0] >> 8;
}

SPECMOE_HD float uniform24(uint32_t bits24) { return float(bits24) * (1.0f / 16777216.0f); }

}  // namespace philox
}  // namespace specmoe
