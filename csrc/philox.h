// Philox-4x32-10 and puregen's counter layout (the contract is written down in
// puregen/kernels/philox.py; tests/test_philox.py pins it with golden vectors).
#pragma once

#include <cmath>
#include <cstdint>

namespace puregen {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr uint64_t kMaxSampleIndex = (uint64_t(1) << 48) - 1;
constexpr uint32_t kMaxStream = 0xFFFF;

struct Words {
  uint32_t w[4];
};

inline Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r) {  // the key is bumped before rounds 2..10, as in Random123
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint64_t p0 = uint64_t(kPhiloxM0) * c0;
    const uint64_t p1 = uint64_t(kPhiloxM1) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c0 = n0;
    c1 = uint32_t(p1);
    c2 = n2;
    c3 = uint32_t(p0);
  }
  return Words{{c0, c1, c2, c3}};
}

// The per-sample part of the counter and the key; only the block (c0) varies
// inside a sample.
struct SampleCounter {
  uint32_t step, idx_lo, stream_hi, k0, k1;

  SampleCounter(uint64_t seed, uint32_t stream, uint32_t step_, uint64_t index)
      : step(step_),
        idx_lo(uint32_t(index)),
        stream_hi(stream | uint32_t((index >> 32) << 16)),
        k0(uint32_t(seed)),
        k1(uint32_t(seed >> 32)) {}

  Words block(uint32_t b) const { return philox4x32_10(b, step, idx_lo, stream_hi, k0, k1); }
};

// Top 23 bits: exact in float32 and strictly inside (0, 1), so logf is finite.
inline float uint32_to_uniform(uint32_t x) {
  return (float(x >> 9) + 0.5f) * 0x1p-23f;
}

// Box-Muller on one Philox output, both outputs of each pair used, in float32
// with the same operation order as the torch reference.
inline void box_muller4(const Words& w, float z[4]) {
  const float two_pi = float(2.0 * M_PI);  // the reference rounds the Python float once
  for (int p = 0; p < 2; ++p) {
    const float ua = uint32_to_uniform(w.w[2 * p]);
    const float ub = uint32_to_uniform(w.w[2 * p + 1]);
    const float radius = std::sqrt(-2.0f * std::log(ua));
    const float angle = two_pi * ub;
    z[2 * p] = radius * std::cos(angle);
    z[2 * p + 1] = radius * std::sin(angle);
  }
}

}  // namespace puregen
