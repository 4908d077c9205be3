// Two ops of the decode path, beside their pure-PyTorch twins (jambalab/ops/fused.py):
// - gemv: y (R, N) = x (R, K) @ W (N, K)^T + bias for R <= 16 rows, x float32, W float32 (twin:
//   F.linear) or bf16 (weight-only bf16: x rounded to bf16, exact products summed in fp32; twin:
//   quant_ref.bf16_gemv_ref);
// - rms_norm: y = x * rsqrt(mean(x^2) + eps) * weight over the last dim (twin:
//   jambalab.ops.rms_norm_ref, HF's op order). On CPU F.rms_norm is a chain of ~7 ops,
//   ~60 us for a 16-wide row; a decode token of bench-hybrid runs 38 norms. x and the weight may
//   also be bf16 (a bf16 model): normalised in fp32, rounded to x's dtype, then scaled, as the twin;
//   only the order of the sum of squares differs from it (and it is each row's own, whatever the batch,
//   so a bf16 model's decode step in step_bf16.cpp computes the same).
//
// Legend: R rows of x (batch x new tokens), K in_features, N out_features, W SIMD lanes.
//
// Why: a decode step is a chain of GEMVs that read every weight once, so its speed is the
// memory bandwidth. torch's mm (MKL) ran these single-threaded at ~7 GB/s on the 2-core
// machine, where the two cores together read ~30 GB/s; the lm_head of bench-hybrid alone
// (65536 x 256, 64 MiB) took 9.4 ms of a 20 ms step. Here output rows are split over the
// threads, each row is one sequential stream, and the K loop runs on explicit SIMD vectors
// (GCC will not vectorise a float reduction without -ffast-math).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "kernels.h"
#include "simd.h"  // kVecBytes, W, vf, load, hsum

namespace {

constexpr int kMaxRows = 16;

// Row r's sum for output o: four independent accumulators (to hide the FMA latency) over the
// K loop, then their sum. The two-row form below runs the very same instructions for each of its
// rows, so a row's result does not depend on the batch (nor on how rows pair up).
ALWAYS_INLINE float finish(vf a0, vf a1, vf a2, vf a3, const float* wo, const float* xr, int64_t k, int64_t K) {
  float t = hsum((a0 + a1) + (a2 + a3));
  for (; k < K; ++k) t += wo[k] * xr[k];
  return t;
}

ALWAYS_INLINE float one_row(const float* wo, const float* xr, int64_t K) {
  vf a0{}, a1{}, a2{}, a3{};
  int64_t k = 0;
  for (; k + 4 * W <= K; k += 4 * W) {
    a0 += load(wo + k) * load(xr + k);
    a1 += load(wo + k + W) * load(xr + k + W);
    a2 += load(wo + k + 2 * W) * load(xr + k + 2 * W);
    a3 += load(wo + k + 3 * W) * load(xr + k + 3 * W);
  }
  for (; k + W <= K; k += W) a0 += load(wo + k) * load(xr + k);
  return finish(a0, a1, a2, a3, wo, xr, k, K);
}

// Two rows at once: each W vector loaded once for both (the loop is bound by loads: 3 per 2 FMAs
// instead of 4).
ALWAYS_INLINE void two_rows(const float* wo, const float* x0, const float* x1, int64_t K, float* y0, float* y1) {
  vf a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
  int64_t k = 0;
  for (; k + 4 * W <= K; k += 4 * W) {
    const vf w0 = load(wo + k), w1 = load(wo + k + W), w2 = load(wo + k + 2 * W), w3 = load(wo + k + 3 * W);
    a0 += w0 * load(x0 + k);
    b0 += w0 * load(x1 + k);
    a1 += w1 * load(x0 + k + W);
    b1 += w1 * load(x1 + k + W);
    a2 += w2 * load(x0 + k + 2 * W);
    b2 += w2 * load(x1 + k + 2 * W);
    a3 += w3 * load(x0 + k + 3 * W);
    b3 += w3 * load(x1 + k + 3 * W);
  }
  for (; k + W <= K; k += W) {
    const vf w0 = load(wo + k);
    a0 += w0 * load(x0 + k);
    b0 += w0 * load(x1 + k);
  }
  *y0 = finish(a0, a1, a2, a3, wo, x0, k, K);
  *y1 = finish(b0, b1, b2, b3, wo, x1, k, K);
}

// One output row o for the R rows of x: a single sequential stream through W's row (the hardware
// prefetcher's best case; a row is re-read from L1 after the first pair, so W is read from memory
// once whatever R is). R is a template argument up to 4 (unrolled) and a run-time one (R = 0 here,
// `rows` given) above.
template <int R>
inline void one_output(const float* x, const float* w, int64_t K, int64_t o, float* y, int64_t N,
                       int64_t rows = R) {
  const float* wo = w + o * K;
  const int64_t n = R ? R : rows;
  int64_t r = 0;
  for (; r + 2 <= n; r += 2) two_rows(wo, x + r * K, x + (r + 1) * K, K, y + r * N + o, y + (r + 1) * N + o);
  if (r < n) y[r * N + o] = one_row(wo, x + r * K, K);
}

template <int R>
void outputs(const float* x, const float* w, const float* bias, float* y, int64_t K, int64_t N, int64_t lo,
             int64_t hi, int64_t rows = R) {
  for (int64_t o = lo; o < hi; ++o) one_output<R>(x, w, K, o, y, N, rows);
  if (bias) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = lo; j < hi; ++j) y[r * N + j] += bias[j];
  }
}

template <int R>
void gemv_rows(const float* x, const float* w, const float* bias, float* y, int64_t K, int64_t N,
               int64_t rows = R) {
  // Each task reads >= ~64 KiB of W: smaller ones cost more in the fork than they save.
  const int64_t grain = std::max<int64_t>(4, 16384 / std::max<int64_t>(1, K));
  at::parallel_for(0, N, grain, [&](int64_t lo, int64_t hi) { outputs<R>(x, w, bias, y, K, N, lo, hi, rows); });
}

// ---------------------------------------------------------------- bf16 weights, fp32 x
// Weight-only bf16 (quant.py's "bf16"): x is rounded to bf16 once per call (round to nearest even, as
// x.to(torch.bfloat16)), then every product of a bf16 x and a bf16 weight is exact in fp32 and summed in
// fp32: what llama.cpp's BF16 matmul computes, and what the prefill's bf16 GEMM computes (its output
// then rounded to bf16). Where the CPU has AVX512-BF16, vdpbf16ps does 32 of these products a
// instruction with no conversion at all; reading the weights widened to fp32 instead (two shuffle-port
// uops per 16 weights) ran 10-30% below it on a Zen 4. Elsewhere the weights widen in registers (split
// trick below). Each row of x runs the same instructions whatever the batch (bitwise the same alone).
//
// The weight stream is prefetched ahead (simd.h's prefetch_weights): a checkpoint already in bf16 is
// memory-mapped, on 4 KiB pages, where the hardware prefetcher stops at every page boundary.
ALWAYS_INLINE void prefetch_lines(const uint16_t* p, int bytes) {
  for (int j = 0; j < bytes; j += 64) prefetch_weights(reinterpret_cast<const char*>(p) + j);
}

#if defined(__AVX512BF16__)
constexpr int kPair = 32;  // bf16 values a vdpbf16ps reads from each operand
typedef uint16_t xbf16;    // the prepared x: bf16 bits

ALWAYS_INLINE __m512bh ld(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
ALWAYS_INLINE __m512bh ld_tail(const uint16_t* p, int64_t n) {
  return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32(1) << n) - 1, p);  // n < 32: zeros add nothing
}
ALWAYS_INLINE float bf16_sum(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

ALWAYS_INLINE float bf16_one_row(const uint16_t* wo, const uint16_t* x0, int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 4 * kPair <= K; k += 4 * kPair) {
    prefetch_lines(wo + k, 4 * kPair * 2);
    a0 = _mm512_dpbf16_ps(a0, ld(wo + k), ld(x0 + k));
    a1 = _mm512_dpbf16_ps(a1, ld(wo + k + kPair), ld(x0 + k + kPair));
    a2 = _mm512_dpbf16_ps(a2, ld(wo + k + 2 * kPair), ld(x0 + k + 2 * kPair));
    a3 = _mm512_dpbf16_ps(a3, ld(wo + k + 3 * kPair), ld(x0 + k + 3 * kPair));
  }
  for (; k + kPair <= K; k += kPair) a0 = _mm512_dpbf16_ps(a0, ld(wo + k), ld(x0 + k));
  if (k < K) a1 = _mm512_dpbf16_ps(a1, ld_tail(wo + k, K - k), ld_tail(x0 + k, K - k));
  return bf16_sum(a0, a1, a2, a3);
}

ALWAYS_INLINE void bf16_two_rows(const uint16_t* wo, const uint16_t* x0, const uint16_t* x1, int64_t K, float* y0,
                                 float* y1) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t k = 0;
  for (; k + 4 * kPair <= K; k += 4 * kPair) {
    prefetch_lines(wo + k, 4 * kPair * 2);
    const __m512bh w0 = ld(wo + k), w1 = ld(wo + k + kPair), w2 = ld(wo + k + 2 * kPair), w3 = ld(wo + k + 3 * kPair);
    a0 = _mm512_dpbf16_ps(a0, w0, ld(x0 + k));
    b0 = _mm512_dpbf16_ps(b0, w0, ld(x1 + k));
    a1 = _mm512_dpbf16_ps(a1, w1, ld(x0 + k + kPair));
    b1 = _mm512_dpbf16_ps(b1, w1, ld(x1 + k + kPair));
    a2 = _mm512_dpbf16_ps(a2, w2, ld(x0 + k + 2 * kPair));
    b2 = _mm512_dpbf16_ps(b2, w2, ld(x1 + k + 2 * kPair));
    a3 = _mm512_dpbf16_ps(a3, w3, ld(x0 + k + 3 * kPair));
    b3 = _mm512_dpbf16_ps(b3, w3, ld(x1 + k + 3 * kPair));
  }
  for (; k + kPair <= K; k += kPair) {
    const __m512bh w0 = ld(wo + k);
    a0 = _mm512_dpbf16_ps(a0, w0, ld(x0 + k));
    b0 = _mm512_dpbf16_ps(b0, w0, ld(x1 + k));
  }
  if (k < K) {
    const __m512bh w0 = ld_tail(wo + k, K - k);
    a1 = _mm512_dpbf16_ps(a1, w0, ld_tail(x0 + k, K - k));
    b1 = _mm512_dpbf16_ps(b1, w0, ld_tail(x1 + k, K - k));
  }
  *y0 = bf16_sum(a0, a1, a2, a3);
  *y1 = bf16_sum(b0, b1, b2, b3);
}

// x (R, K) as bf16 bits, as is: float32 x rounded, bf16 x (its raw bits) unchanged.
ALWAYS_INLINE uint16_t bf16_bits(float v) { return c10::BFloat16(v).x; }
ALWAYS_INLINE uint16_t bf16_bits(uint16_t v) { return v; }

template <typename T>
void bf16_prepare(const T* x, int64_t R, int64_t K, xbf16* xp) {
  for (int64_t i = 0; i < R * K; ++i) xp[i] = bf16_bits(x[i]);
}
#else
// No AVX512-BF16: a vector of W uint32 lanes holds 2W bf16 weights, k even in the low half of each lane
// and k odd in the high half. Each half is an fp32 exactly: u << 16 (the even ones) and u & 0xffff0000
// (the odd ones), two plain integer ops (widening W bf16 to W lanes is a cross-lane shuffle). So the
// rounded x is stored as fp32, split per block of 2W values into its W even then its W odd values; the
// tail past the last full block stays in order.
typedef float xbf16;
constexpr int kSplit = 2 * W;  // bf16 weights per vector load

ALWAYS_INLINE vu32 wload32(const uint16_t* p) {  // vu32: W uint32 lanes (simd.h)
  vu32 u;
  std::memcpy(&u, p, sizeof u);
  return u;
}
ALWAYS_INLINE vf even(vu32 u) { return std::bit_cast<vf>(u << 16); }
ALWAYS_INLINE vf odd(vu32 u) { return std::bit_cast<vf>(u & 0xffff0000u); }
ALWAYS_INLINE float bf16_one(uint16_t v) { return std::bit_cast<float>(static_cast<uint32_t>(v) << 16); }

ALWAYS_INLINE float bf16_finish(vf a0, vf a1, vf a2, vf a3, const uint16_t* wo, const float* xs, int64_t k, int64_t K) {
  float t = hsum((a0 + a1) + (a2 + a3));
  for (; k < K; ++k) t += bf16_one(wo[k]) * xs[k];
  return t;
}

// R rows (1-4) of x against one weight row, k in [kb, ke): each row's four chains start from zero at kb == 0,
// else from carry (R x 4 vectors), and go back to it when ke < K; the block that ends at K adds the tails and
// writes y[r * N]. Each vector of weights is loaded and widened once for all R rows. Per row the chains see
// the same products in the same order for any R and any blocks whose bounds are multiples of 2 * kSplit,
// so a row's sum is bitwise the one it gets alone in one pass.
template <int R>
ALWAYS_INLINE void bf16_rows(const uint16_t* wo, const float* xs, int64_t K, int64_t kb, int64_t ke, vf* carry,
                             float* y, int64_t N) {
  vf acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = kb == 0 ? vf{} : carry[r * 4 + c];
  const int64_t main_end = std::min(ke, K / (2 * kSplit) * (2 * kSplit));
  int64_t k = kb;
  for (; k < main_end; k += 2 * kSplit) {
    prefetch_lines(wo + k, 2 * kSplit * 2);
    const vu32 u0 = wload32(wo + k), u1 = wload32(wo + k + kSplit);
    const vf e0 = even(u0), o0 = odd(u0), e1 = even(u1), o1 = odd(u1);
    for (int r = 0; r < R; ++r) {
      const float* xr = xs + r * K + k;
      acc[r][0] += e0 * load(xr);
      acc[r][1] += o0 * load(xr + W);
      acc[r][2] += e1 * load(xr + kSplit);
      acc[r][3] += o1 * load(xr + kSplit + W);
    }
  }
  if (ke < K) {
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) carry[r * 4 + c] = acc[r][c];
    return;
  }
  for (; k + kSplit <= K; k += kSplit) {
    const vu32 u0 = wload32(wo + k);
    const vf e0 = even(u0), o0 = odd(u0);
    for (int r = 0; r < R; ++r) {
      acc[r][0] += e0 * load(xs + r * K + k);
      acc[r][1] += o0 * load(xs + r * K + k + W);
    }
  }
  for (int r = 0; r < R; ++r) y[r * N] = bf16_finish(acc[r][0], acc[r][1], acc[r][2], acc[r][3], wo, xs + r * K, k, K);
}

void bf16_row_group(int64_t rows, const uint16_t* wo, const float* xs, int64_t K, int64_t kb, int64_t ke, vf* carry,
                    float* y, int64_t N) {
  switch (rows) {
    case 1: bf16_rows<1>(wo, xs, K, kb, ke, carry, y, N); break;
    case 2: bf16_rows<2>(wo, xs, K, kb, ke, carry, y, N); break;
    case 3: bf16_rows<3>(wo, xs, K, kb, ke, carry, y, N); break;
    default: bf16_rows<4>(wo, xs, K, kb, ke, carry, y, N); break;
  }
}

// x (R, K) rounded to bf16 (float32 x) or widened (bf16 x, its raw bits: exact), in the split layout.
ALWAYS_INLINE float bf16_value(float v) { return static_cast<float>(c10::BFloat16(v)); }
ALWAYS_INLINE float bf16_value(uint16_t v) { return bf16_one(v); }

template <typename T>
void bf16_prepare(const T* x, int64_t R, int64_t K, xbf16* xp) {
  for (int64_t r = 0; r < R; ++r) {
    const T* xr = x + r * K;
    float* out = xp + r * K;
    const auto round = [](T v) { return bf16_value(v); };
    int64_t k = 0;
    for (; k + kSplit <= K; k += kSplit) {
      for (int j = 0; j < W; ++j) {
        out[k + j] = round(xr[k + 2 * j]);
        out[k + W + j] = round(xr[k + 2 * j + 1]);
      }
    }
    for (; k < K; ++k) out[k] = round(xr[k]);
  }
}
#endif

#if defined(__AVX512BF16__)
void bf16_products(const xbf16* xp, int64_t R, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t lo,
                   int64_t hi) {
  for (int64_t o = lo; o < hi; ++o) {
    const uint16_t* wo = w + o * K;
    int64_t r = 0;
    for (; r + 2 <= R; r += 2) bf16_two_rows(wo, xp + r * K, xp + (r + 1) * K, K, y + r * N + o, y + (r + 1) * N + o);
    if (r < R) y[r * N + o] = bf16_one_row(wo, xp + r * K, K);
  }
}
#else
constexpr int64_t kWidenXBytes = 16 << 10;  // 2-4 rows of x (fp32) of one K block: a third of L1, beside the weights
constexpr int64_t kWidenOutBlock = 32;      // outputs walked together block by block of K
constexpr int kWidenRows = 4;               // rows a widened weight vector serves

void bf16_products(const xbf16* xp, int64_t R, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t lo,
                   int64_t hi) {
  const int64_t step = 2 * kSplit, block = std::max(step, kWidenXBytes / (4 * R) / step * step);
  if (R >= 2 && R <= kWidenRows && K > block) {
    // 2-4 rows whose x does not fit in L1: each block of outputs is walked in blocks of K, x's block
    // staying in L1 while the weights stream; the chains are carried between the blocks.
    std::vector<vf> carry(kWidenOutBlock * R * 4);
    outputs_by_k_blocks(lo, hi, K, block, kWidenOutBlock, [&](int64_t o, int64_t i, int64_t kb, int64_t ke) {
      bf16_row_group(R, w + o * K, xp, K, kb, ke, carry.data() + i * R * 4, y + o, N);
    });
    return;
  }
  // One row, or more than 4: each output's weight row serves the rows in groups of 4 (from L1 after the first).
  vf unused[kWidenRows * 4];
  if (R == 1) {  // decode's common case, without the dispatch per output
    for (int64_t o = lo; o < hi; ++o) bf16_rows<1>(w + o * K, xp, K, 0, K, unused, y + o, N);
    return;
  }
  for (int64_t o = lo; o < hi; ++o)
    for (int64_t g = 0; g < R; g += kWidenRows)
      bf16_row_group(std::min<int64_t>(kWidenRows, R - g), w + o * K, xp + g * K, K, 0, K, unused, y + g * N + o, N);
}
#endif

void bf16_outputs(const xbf16* xp, int64_t R, const uint16_t* w, const float* bias, float* y, int64_t K, int64_t N,
                  int64_t lo, int64_t hi) {
  bf16_products(xp, R, w, y, K, N, lo, hi);
  if (bias) {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = lo; j < hi; ++j) y[r * N + j] += bias[j];
  }
}

}  // namespace

namespace jambalab {

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "gemv: float32 x and a float32 or bf16 weight, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "gemv: x must be contiguous (R, K)");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "gemv: weight must be contiguous (N, K)");
  const int64_t R = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "gemv: x ", x.sizes(), " and weight ", weight.sizes(), " disagree on K");
  TORCH_CHECK(R >= 1 && R <= kMaxRows, "gemv: 1 to ", kMaxRows, " rows, got ", R);
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "gemv: bias must be contiguous float32 (N,)");
  }
  auto y = at::empty({R, N}, x.options());
  if (weight.scalar_type() == at::kBFloat16) {
    const Bf16Rows xb(x.data_ptr<float>(), R, K);
    const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<c10::BFloat16>());
    const float* bp = bias ? bias->data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(4, 32768 / std::max<int64_t>(1, K));  // >= ~64 KiB of W a task
    at::parallel_for(0, N, grain, [&](int64_t lo, int64_t hi) { xb.outputs(wp, bp, yp, N, lo, hi); });
    return y;
  }
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  switch (R) {
    case 1: gemv_rows<1>(xp, wp, bp, yp, K, N); break;
    case 2: gemv_rows<2>(xp, wp, bp, yp, K, N); break;
    case 3: gemv_rows<3>(xp, wp, bp, yp, K, N); break;
    case 4: gemv_rows<4>(xp, wp, bp, yp, K, N); break;
    default: gemv_rows<0>(xp, wp, bp, yp, K, N, R); break;
  }
  return y;
}

void gemv_outputs(const float* x, int64_t R, const float* w, const float* bias, float* y, int64_t K, int64_t N,
                  int64_t lo, int64_t hi) {
  switch (R) {
    case 1: outputs<1>(x, w, bias, y, K, N, lo, hi); break;
    case 2: outputs<2>(x, w, bias, y, K, N, lo, hi); break;
    case 3: outputs<3>(x, w, bias, y, K, N, lo, hi); break;
    case 4: outputs<4>(x, w, bias, y, K, N, lo, hi); break;
    default: outputs<0>(x, w, bias, y, K, N, lo, hi, R); break;
  }
}

Bf16Rows::Bf16Rows(const float* x, int64_t R, int64_t K) : R_(R), K_(K), x_(R * K * sizeof(xbf16) / 2) {
  bf16_prepare(x, R, K, reinterpret_cast<xbf16*>(x_.data()));
}

Bf16Rows::Bf16Rows(const uint16_t* x, int64_t R, int64_t K) : R_(R), K_(K), x_(R * K * sizeof(xbf16) / 2) {
  bf16_prepare(x, R, K, reinterpret_cast<xbf16*>(x_.data()));
}

void Bf16Rows::outputs(const uint16_t* w, const float* bias, float* y, int64_t N, int64_t lo, int64_t hi) const {
  bf16_outputs(reinterpret_cast<const xbf16*>(x_.data()), R_, w, bias, y, K_, N, lo, hi);
}

}  // namespace jambalab

namespace {

// ---------------------------------------------------------------- rms_norm

// 1 / sqrt(mean(x^2) + eps) of a row of K floats.
float rms_inverse(const float* x, int64_t K, float eps) {
  vf a0{}, a1{};
  int64_t k = 0;
  for (; k + 2 * W <= K; k += 2 * W) {
    const vf u = load(x + k), v = load(x + k + W);
    a0 += u * u;
    a1 += v * v;
  }
  for (; k + W <= K; k += W) {
    const vf u = load(x + k);
    a0 += u * u;
  }
  float ss = hsum(a0 + a1);
  for (; k < K; ++k) ss += x[k] * x[k];
  return 1.0f / std::sqrt(ss / static_cast<float>(K) + eps);
}

void rms_row(const float* x, const float* w, float* y, int64_t K, float eps) {
  const float inv = rms_inverse(x, K, eps);
  if (w) {
    for (int64_t j = 0; j < K; ++j) y[j] = w[j] * (x[j] * inv);
  } else {
    for (int64_t j = 0; j < K; ++j) y[j] = x[j] * inv;
  }
}

float as_float(float v) { return v; }
float as_float(c10::BFloat16 v) { return static_cast<float>(v); }

// A row of a 16-bit RMSNorm in HF's op order: normalised in fp32 and rounded to x's dtype X, then
// multiplied by the weight (of dtype Wt, or none) in fp32 and stored as Y (the promoted dtype: bf16 only
// when x and the weight both are). `f` is scratch for K floats.
template <typename X, typename Wt, typename Y>
void rms_row_lowp(const X* x, const Wt* w, Y* y, int64_t K, float eps, float* f) {
  for (int64_t j = 0; j < K; ++j) f[j] = as_float(x[j]);
  const float inv = rms_inverse(f, K, eps);
  for (int64_t j = 0; j < K; ++j) {
    const float n = as_float(static_cast<X>(f[j] * inv));
    y[j] = static_cast<Y>(w ? as_float(w[j]) * n : n);
  }
}

}  // namespace

namespace jambalab {

void rms_norm_rows(const float* x, const float* w, float* y, int64_t rows, int64_t K, float eps) {
  for (int64_t r = 0; r < rows; ++r) rms_row(x + r * K, w, y + r * K, K, eps);
}

void rms_norm_rows_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t rows, int64_t K, float eps) {
  std::vector<float> f(K);
  const auto* xb = reinterpret_cast<const c10::BFloat16*>(x);
  const auto* wb = reinterpret_cast<const c10::BFloat16*>(w);
  auto* yb = reinterpret_cast<c10::BFloat16*>(y);
  for (int64_t r = 0; r < rows; ++r) rms_row_lowp(xb + r * K, wb, yb + r * K, K, eps, f.data());
}

void rms_norm_rows_f32_bf16w(const float* x, const uint16_t* w, float* y, int64_t rows, int64_t K, float eps) {
  std::vector<float> f(K);
  const auto* wb = reinterpret_cast<const c10::BFloat16*>(w);
  for (int64_t r = 0; r < rows; ++r) rms_row_lowp(x + r * K, wb, y + r * K, K, eps, f.data());
}

at::Tensor rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps) {
  const auto xt = x.scalar_type(), wt = weight ? weight->scalar_type() : xt;
  const bool lowp = xt == at::kBFloat16 || wt == at::kBFloat16;
  TORCH_CHECK((xt == at::kFloat || xt == at::kBFloat16) && (wt == at::kFloat || wt == at::kBFloat16) &&
                  x.is_contiguous() && x.dim() >= 1,
              "rms_norm: x must be contiguous float32 or bf16, the weight float32 or bf16");
  const int64_t K = x.size(-1), rows = K ? x.numel() / K : 0;
  if (weight) {
    TORCH_CHECK(weight->is_contiguous() && weight->numel() == K, "rms_norm: weight must be contiguous (", K, ",)");
  }
  const float e = static_cast<float>(eps);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K));
  if (!lowp) {
    auto y = at::empty(x.sizes(), x.options());
    const float* xp = x.data_ptr<float>();
    const float* wp = weight ? weight->data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) rms_row(xp + r * K, wp, yp + r * K, K, e);
    });
    return y;
  }
  // 16-bit: normalised in fp32, rounded to x's dtype, scaled in the promoted dtype (rms_norm_ref's order).
  const auto yt = xt == at::kBFloat16 && wt == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
  auto y = at::empty(x.sizes(), x.options().dtype(yt));
  const auto run = [&](auto xtag, auto wtag, auto ytag) {
    using X = decltype(xtag);
    using Wt = decltype(wtag);
    using Y = decltype(ytag);
    const X* xp = x.data_ptr<X>();
    const Wt* wp = weight ? weight->data_ptr<Wt>() : nullptr;
    Y* yp = y.data_ptr<Y>();
    at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
      std::vector<float> f(K);
      for (int64_t r = lo; r < hi; ++r) rms_row_lowp(xp + r * K, wp, yp + r * K, K, e, f.data());
    });
  };
  using BF = c10::BFloat16;
  if (xt == at::kBFloat16 && wt == at::kBFloat16) {
    run(BF{}, BF{}, BF{});
  } else if (xt == at::kBFloat16) {
    run(BF{}, 0.0f, 0.0f);
  } else {
    run(0.0f, BF{}, 0.0f);
  }
  return y;
}

}  // namespace jambalab

TORCH_LIBRARY_FRAGMENT(jambalab_kernels, m) {
  m.def("gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor? weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(jambalab_kernels, CPU, m) {
  m.impl("gemv", &jambalab::gemv);
  m.impl("rms_norm", &jambalab::rms_norm);
}
