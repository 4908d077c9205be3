// SIMD basics shared by the CPU kernels: one register of floats as a GCC vector type,
// sized for the widest ISA the compiler targets (-march=native), its horizontal sum, and a
// scalar 2^u that GCC vectorises in loops.
//
// Legend: W lanes (floats per register).
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
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

// W floats from p (no alignment needed).
ALWAYS_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The sum of the lanes, by halving: s[i] += s[i + w] for w = W/2, ..., 1 (log2 W adds on the
// critical path, not W). Each halving is one vector add of v and its upper half moved down (the
// lanes at and above w are then unused), so it stays in registers; the adds, and so the bits, are
// those of the scalar loop. A GEMV of K = 256 spent about a third of its time in the scalar one.
typedef int vidx __attribute__((vector_size(kVecBytes)));  // lane indices for __builtin_shuffle

template <int w>
ALWAYS_INLINE vf fold(vf v) {
  vidx idx;
  for (int i = 0; i < W; ++i) idx[i] = (i + w) % W;
  return v + __builtin_shuffle(v, idx);
}

ALWAYS_INLINE float hsum(vf v) {
  if constexpr (W >= 16) v = fold<8>(v);
  if constexpr (W >= 8) v = fold<4>(v);
  v = fold<2>(v);
  v = fold<1>(v);
  return v[0];
}

// W bf16 values (their 16 bits) -> W floats: bf16 is the top half of an fp32, so a zero-extend and a
// shift are the exact conversion (vpmovzxwd + vpslld).
typedef uint16_t vu16 __attribute__((vector_size(2 * W)));
typedef uint32_t vu32 __attribute__((vector_size(4 * W)));

ALWAYS_INLINE vf bf16_to_vf(const uint16_t* p) {
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  const vu32 u = __builtin_convertvector(h, vu32) << 16;
  vf f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Software prefetch of a weight stream: the cache line kWeightAhead bytes past p, into L2 (locality 2:
// _MM_HINT_T1). Decode GEMVs read each weight once, in order, and interleave that with more arithmetic
// per byte than a plain sum (4-bit: two nibble unpacks and two int8 dot products per 64 bytes); without
// it, one Zen 4 core read 4-bit weights at ~14 GB/s, its arithmetic and its misses taking turns, where
// its loads alone reach ~24. Memory-mapped weights sit on 4 KiB pages, where the hardware prefetcher
// stops at every page boundary. 4-8 KiB ahead, into L2, measured best (a standalone copy of the 4-bit
// kernel, 2 threads, 3328 x 1024 matrices from DRAM: 21-24 GB/s without, 28-30 with; into L1 at 2 KiB
// ahead, 25-27). Rows are contiguous, so it runs on into the next rows (and past a matrix's end, which
// a prefetch may: it never faults).
constexpr int64_t kWeightAhead = 6144;

// The walk of a GEMV's 2-4 rows whose x does not fit in L1: outputs [lo, hi) in blocks of out_block, each
// block walked in blocks of K of `block` values, so x's block stays in L1 while the weights stream;
// body(o, o - o0, kb, ke) for each output o of the block o0.. and each K block [kb, ke), in that order.
template <typename F>
ALWAYS_INLINE void outputs_by_k_blocks(int64_t lo, int64_t hi, int64_t K, int64_t block, int64_t out_block,
                                       const F& body) {
  for (int64_t o0 = lo; o0 < hi; o0 += out_block) {
    const int64_t oe = std::min(hi, o0 + out_block);
    for (int64_t kb = 0; kb < K; kb += block) {
      const int64_t ke = std::min(K, kb + block);
      for (int64_t o = o0; o < oe; ++o) body(o, o - o0, kb, ke);
    }
  }
}
// prefetch_weights_at: `ahead` bytes past p (also for a stream that is not read in address order).
ALWAYS_INLINE void prefetch_weights_at(const void* p, int64_t ahead) {
  __builtin_prefetch(static_cast<const char*>(p) + ahead, 0, 2);
}
ALWAYS_INLINE void prefetch_weights(const void* p) { prefetch_weights_at(p, kWeightAhead); }

// 2^u, branch-free so that GCC vectorises the loops calling it (std::exp stays a scalar
// libm call without -ffast-math, and was most of the conv kernel's time): u = n + r with n an
// integer, |r| <= 1/2, 2^r by its degree-6 Taylor polynomial (relative error < 2e-7).
inline float exp2_fast(float u) {
  u = u < -126.0f ? -126.0f : u;
  u = u > 127.0f ? 127.0f : u;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: u + kRound holds round(u) in its low mantissa bits
  const float t = u + kRound;
  const float r = u - (t - kRound);
  float p = 1.5403530e-4f;
  p = p * r + 1.3333558e-3f;
  p = p * r + 9.6181291e-3f;
  p = p * r + 5.5504109e-2f;
  p = p * r + 2.4022651e-1f;
  p = p * r + 6.9314718e-1f;
  p = p * r + 1.0f;
  const int32_t n = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(kRound);
  return p * std::bit_cast<float>((n + 127) << 23);
}

}  // namespace
