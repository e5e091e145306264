// Attention dropout's random numbers, the same on every backend: Philox4x32-10 (Salmon et al.,
// "Parallel random numbers: as easy as 1, 2, 3"), with the round and key constants of Triton's
// tl.philox, so the triton backend draws the very same bits. For batch b, query head h, query
// row i and key j the counter is (row, row >> 32, j >> 2, 0) with row = (b * Hq + h) * Lq + i,
// the key is the 64-bit seed, and output j & 3 is the draw; a key is kept when draw >= threshold
// (dropout_p * 2^32). The reference (mmkernels/backends/reference.py) spells out the same.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MMKERNELS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MMKERNELS_HOST_DEVICE inline
#endif

namespace mmkernels {

struct Philox4 {
  uint32_t x[4];
};

MMKERNELS_HOST_DEVICE Philox4 philox4x32(uint64_t row, uint32_t quad, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(row), c1 = static_cast<uint32_t>(row >> 32), c2 = quad, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;
    c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// Draws below the threshold are dropped; p in [0, 1).
inline uint64_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967296.0 ? 4294967296ull : static_cast<uint64_t>(t);
}

}  // namespace mmkernels
