// SIMD basics shared by the CPU kernels: one register of floats as a GCC vector type,
// sized for the widest ISA the compiler targets (-march=native), and its horizontal sum.
//
// Legend: W lanes (floats per register).
#pragma once

#include <cstring>

namespace {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
constexpr int W = kVecBytes / 4;

typedef float vf __attribute__((vector_size(kVecBytes)));

// Small helpers are forced inline: a call per time step (GCC declined to inline the scan's
// block loads) costs as much as a sizeable part of the step's work.
#define ALWAYS_INLINE inline __attribute__((always_inline))

// The sum of the lanes, by halving (log2 W adds on the critical path, not W).
ALWAYS_INLINE float hsum(vf v) {
  alignas(kVecBytes) float s[W];
  std::memcpy(s, &v, sizeof v);
  for (int w = W / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) s[i] += s[i + w];
  return s[0];
}

}  // namespace
