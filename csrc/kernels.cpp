// Fused CPU kernels of the purifiers' update steps (C ABI, no torch).
//
// Arrays are contiguous float32 of shape (B, numel); sample b's noise comes
// from Philox with the counter of its global index indices[b], drawn inside
// the kernel so no noise tensor is ever stored. Each output element is a pure
// function of its inputs and its counter, so results do not depend on the
// thread count or on how the work is split.
//
// The arithmetic follows puregen/kernels/reference.py operation by operation
// in float32 (the library is built with -ffp-contract=off so that no multiply
// and add are fused): the only differences from the reference come from the
// libm logf/cosf/sinf versus torch's vectorized ones.

#include <cstdint>

#include "philox.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define PUREGEN_API extern "C" __attribute__((visibility("default")))

namespace {

using puregen::SampleCounter;
using puregen::Words;

constexpr int kAbiVersion = 1;

enum Status : int { kOk = 0, kBadArgument = 1, kBadIndex = 2 };

int check(const int64_t* indices, int64_t B, int64_t numel, uint32_t stream) {
  if (B < 0 || numel < 0 || stream > puregen::kMaxStream) return kBadArgument;
  if (B > 0 && !indices) return kBadArgument;
  // The counter holds 32 + 16 bits of the index and numel // 4 in 32 bits.
  if (numel / 4 > int64_t(UINT32_MAX)) return kBadArgument;
  for (int64_t b = 0; b < B; ++b)
    if (indices[b] < 0 || uint64_t(indices[b]) > puregen::kMaxSampleIndex) return kBadIndex;
  return kOk;
}

// Calls f(offset, count, z) for every 4-element block of every sample, where
// offset is the flat position of the block's first element in the (B, numel)
// array, count <= 4 the number of elements it covers (the last block of a
// sample drops its extra words) and z its four normals.
template <class F>
void for_each_block(const int64_t* indices, int64_t B, int64_t numel, uint64_t seed, uint32_t stream, uint32_t step,
                    int nthreads, F f) {
  const int64_t blocks = (numel + 3) / 4;
#ifdef _OPENMP
  const int nt = nthreads > 0 ? nthreads : omp_get_max_threads();
#pragma omp parallel for collapse(2) schedule(static) num_threads(nt) if (B * blocks > 256)
#else
  (void)nthreads;
#endif
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const SampleCounter ctr(seed, stream, step, uint64_t(indices[b]));
      float z[4];
      puregen::box_muller4(ctr.block(uint32_t(blk)), z);
      const int64_t e0 = 4 * blk;
      const int count = numel - e0 < 4 ? int(numel - e0) : 4;
      f(b * numel + e0, count, z);
    }
  }
}

}  // namespace

PUREGEN_API int puregen_native_abi_version(void) { return kAbiVersion; }

// The integer stream, (B, num_blocks, 4) uint32: for parity with the golden vectors.
PUREGEN_API int puregen_random_uint32(const int64_t* indices, int64_t B, uint64_t seed, uint32_t stream,
                                      uint32_t step, int64_t num_blocks, uint32_t* out) {
  if (int s = check(indices, B, 0, stream)) return s;
  if (num_blocks < 0 || num_blocks > int64_t(UINT32_MAX) + 1 || (B * num_blocks > 0 && !out)) return kBadArgument;
  for (int64_t b = 0; b < B; ++b) {
    const SampleCounter ctr(seed, stream, step, uint64_t(indices[b]));
    for (int64_t blk = 0; blk < num_blocks; ++blk) {
      const Words w = ctr.block(uint32_t(blk));
      for (int k = 0; k < 4; ++k) out[(b * num_blocks + blk) * 4 + k] = w.w[k];
    }
  }
  return kOk;
}

// Standard normals, (B, numel) float32.
PUREGEN_API int puregen_normal_noise(const int64_t* indices, int64_t B, int64_t numel, uint64_t seed, uint32_t stream,
                                     uint32_t step, float* out, int nthreads) {
  if (int s = check(indices, B, numel, stream)) return s;
  if (B * numel > 0 && !out) return kBadArgument;
  for_each_block(indices, B, numel, seed, stream, step, nthreads, [=](int64_t o, int count, const float* z) {
    for (int k = 0; k < count; ++k) out[o + k] = z[k];
  });
  return kOk;
}

// out = x - drift * grad + noise_scale * n ; out may be x (in place).
PUREGEN_API int puregen_langevin_update(const float* x, const float* grad, float* out, int64_t B, int64_t numel,
                                        float drift, float noise_scale, const int64_t* indices, uint64_t seed,
                                        uint32_t stream, uint32_t step, int nthreads) {
  if (int s = check(indices, B, numel, stream)) return s;
  if (B * numel > 0 && (!x || !grad || !out)) return kBadArgument;
  for_each_block(indices, B, numel, seed, stream, step, nthreads, [=](int64_t o, int count, const float* z) {
    for (int k = 0; k < count; ++k) {
      const float moved = x[o + k] - drift * grad[o + k];
      out[o + k] = moved + noise_scale * z[k];
    }
  });
  return kOk;
}

// x_t = sqrt(abar) * x0 + sqrt(1 - abar) * n, noise step 0 of its stream.
PUREGEN_API int puregen_ddpm_forward_noise(const float* x0, float* out, int64_t B, int64_t numel, float sqrt_abar,
                                           float sqrt_1m_abar, const int64_t* indices, uint64_t seed, uint32_t stream,
                                           int nthreads) {
  if (int s = check(indices, B, numel, stream)) return s;
  if (B * numel > 0 && (!x0 || !out)) return kBadArgument;
  for_each_block(indices, B, numel, seed, stream, 0, nthreads, [=](int64_t o, int count, const float* z) {
    for (int k = 0; k < count; ++k) out[o + k] = sqrt_abar * x0[o + k] + sqrt_1m_abar * z[k];
  });
  return kOk;
}

// One ancestral step t -> t-1 (noise step t); out may be x_t (in place).
PUREGEN_API int puregen_ddpm_reverse_step(const float* x_t, const float* eps, float* out, int64_t B, int64_t numel,
                                          uint32_t t, float recip_sqrt_abar, float sqrt_recip_abar_m1, float mean_x0,
                                          float mean_xt, float sigma, int clip_x0, const int64_t* indices,
                                          uint64_t seed, uint32_t stream, int nthreads) {
  if (int s = check(indices, B, numel, stream)) return s;
  if (B * numel > 0 && (!x_t || !eps || !out)) return kBadArgument;
  auto mean_at = [=](int64_t i) {
    float x0 = recip_sqrt_abar * x_t[i] - sqrt_recip_abar_m1 * eps[i];
    // Written with comparisons (not fminf/fmaxf) so that NaN passes through as in torch.clamp.
    if (clip_x0) x0 = x0 < -1.0f ? -1.0f : (x0 > 1.0f ? 1.0f : x0);
    return mean_x0 * x0 + mean_xt * x_t[i];
  };
  if (t == 0) {  // the last step adds no noise: skip the Philox work entirely
    const int64_t n = B * numel;
#ifdef _OPENMP
    const int nt = nthreads > 0 ? nthreads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(nt) if (n > 4096)
#endif
    for (int64_t i = 0; i < n; ++i) out[i] = mean_at(i);
    return kOk;
  }
  for_each_block(indices, B, numel, seed, stream, t, nthreads, [=](int64_t o, int count, const float* z) {
    for (int k = 0; k < count; ++k) out[o + k] = mean_at(o + k) + sigma * z[k];
  });
  return kOk;
}
