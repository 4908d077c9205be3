// Decode GEMVs that read low-precision weights directly, and the tile dequantizer of the prefill
// path, beside their pure-PyTorch twins (jambalab/ops/quant_ref.py):
// - wgemv: y (R, N) = x (R, K) @ W^T (+ bias) for R <= 4 rows, W one of
//     bf16 / fp16 (N, K)                     16-bit floats, converted to fp32 in registers;
//     int8 (N, K) + fp16 scales (N, K/G)     w = q * s[group], q in [-127, 127];
//     uint8 (N, K/2) + fp16 scales (N, K/G)  4-bit, w = (u - 8) * s[group], u in [0, 15];
//   x is fp32 or bf16, the arithmetic fp32, y in x's dtype;
// - dequant: rows [lo, hi) of such a W as a dense fp32 or bf16 (hi - lo, K) tile.
//
// 4-bit layout (fixed, independent of the SIMD width, so a saved checkpoint loads anywhere): each
// run of 32 weights k0..k0+31 is 16 bytes; byte j holds weight k0+j in its low nibble and
// k0+16+j in its high nibble (llama.cpp's Q4_0 order). G is a multiple of 32.
//
// Legend: R rows of x, K in_features, N out_features, G group size, W SIMD lanes.
//
// Why: a decode step reads every weight once, so its time is bytes / bandwidth. A dequantized
// copy of the matrix (what quant.Int8Linear did) reads 1 byte and writes and re-reads 4 per
// weight; torch's _weight_int8pack_mm and _weight_int4pack_mm_for_cpu ran a 1-row GEMV at
// 1-3 GB/s on the 2-core machine. Here the weights stream through once, at the bandwidth.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "kernels.h"  // kBf16DotRows, Bf16Dot, Bf16Rows
#include "simd.h"  // kVecBytes, W, vf, load, hsum

namespace {

constexpr int kMaxRows = 4;
constexpr int kRun = 32;  // 4-bit packing run (16 bytes)

enum class Fmt { BF16, F16, I8, I4 };

ALWAYS_INLINE vf f16_to_vf(const c10::Half* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__AVX__) && defined(__F16C__)
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
  alignas(kVecBytes) float t[W];
  for (int i = 0; i < W; ++i) t[i] = static_cast<float>(p[i]);  // vcvtph2ps with F16C
  return load(t);
}

// W int8 -> W floats. GCC turns __builtin_convertvector(int8 -> float) into W scalar converts,
// so the x86 paths use the sign-extending load and the int -> float convert explicitly.
ALWAYS_INLINE vf i8_to_vf(const int8_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  alignas(kVecBytes) float t[W];
  for (int i = 0; i < W; ++i) t[i] = static_cast<float>(p[i]);
  return load(t);
#endif
}

// W packed bytes -> the W low nibbles and the W high nibbles, minus 8, as floats.
ALWAYS_INLINE void i4_to_vf(const uint8_t* p, vf& lo, vf& hi) {
#if defined(__AVX512F__)
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i eight = _mm512_set1_epi32(8), mask = _mm512_set1_epi32(0xF);
  lo = (vf)_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, mask), eight));
  hi = (vf)_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), eight));
#elif defined(__AVX2__)
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i eight = _mm256_set1_epi32(8), mask = _mm256_set1_epi32(0xF);
  lo = (vf)_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b, mask), eight));
  hi = (vf)_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 4), eight));
#else
  alignas(kVecBytes) float l[W], h[W];
  for (int i = 0; i < W; ++i) {
    l[i] = static_cast<float>((p[i] & 0xF) - 8);
    h[i] = static_cast<float>((p[i] >> 4) - 8);
  }
  lo = load(l);
  hi = load(h);
#endif
}

// Weights of one row as fp32 vectors, W at a time, for the two dense float formats.
template <Fmt F>
ALWAYS_INLINE vf wload(const void* row, int64_t k) {
  if constexpr (F == Fmt::BF16) return bf16_to_vf(static_cast<const uint16_t*>(row) + k);
  else if constexpr (F == Fmt::F16) return f16_to_vf(static_cast<const c10::Half*>(row) + k);
  else return i8_to_vf(static_cast<const int8_t*>(row) + k);
}

template <Fmt F>
ALWAYS_INLINE float wscalar(const void* row, int64_t k) {
  if constexpr (F == Fmt::BF16) return static_cast<float>(static_cast<const c10::BFloat16*>(row)[k]);
  else if constexpr (F == Fmt::F16) return static_cast<float>(static_cast<const c10::Half*>(row)[k]);
  else return static_cast<float>(static_cast<const int8_t*>(row)[k]);
}

// Independent accumulator chains per row: an FMA waits ~4 cycles for the one before it, so a single
// chain per row runs at a fraction of the FMA units' rate (the first version of this kernel read
// 1.16 GB a token at ~8 GB/s on 2 threads where the fp32 gemv, with 4 chains, read ~26 GB/s).
template <int R>
constexpr int kChains = R == 1 ? 4 : (R == 2 ? 2 : 1);

// sum_k w[k] * x[k] over [k0, k1) for the R rows of x (stride K), into acc[r][c] (vector partial sums).
template <Fmt F, int R, int C = kChains<R>>
ALWAYS_INLINE void dot_span(const void* row, const float* x, int64_t K, int64_t k0, int64_t k1, vf (&acc)[R][C]) {
  int64_t k = k0;
  for (; k + C * W <= k1; k += C * W) {
    for (int c = 0; c < C; ++c) {
      const vf w = wload<F>(row, k + c * W);
      for (int r = 0; r < R; ++r) acc[r][c] += w * load(x + r * K + k + c * W);
    }
  }
  for (; k + W <= k1; k += W) {
    const vf w = wload<F>(row, k);
    for (int r = 0; r < R; ++r) acc[r][0] += w * load(x + r * K + k);
  }
  if (k < k1) {  // tail: at most W - 1 weights, as one zero-padded vector
    alignas(kVecBytes) float wt[W] = {}, xt[W] = {};
    for (int64_t j = k; j < k1; ++j) wt[j - k] = wscalar<F>(row, j);
    for (int r = 0; r < R; ++r) {
      for (int64_t j = k; j < k1; ++j) xt[j - k] = x[r * K + j];
      acc[r][0] += load(wt) * load(xt);
    }
  }
}

// 4-bit: the runs of 32 in [k0, k1) (k0, k1 multiples of 32); low nibbles into chain 0, high into chain 1.
template <int R, int C = kChains<R>>
ALWAYS_INLINE void dot_span_i4(const uint8_t* row, const float* x, int64_t K, int64_t k0, int64_t k1,
                               vf (&acc)[R][C]) {
  constexpr int hi_chain = C > 1 ? 1 : 0;
  for (int64_t k = k0; k < k1; k += kRun) {
    const uint8_t* p = row + k / 2;
    for (int j = 0; j < kRun / 2; j += W) {  // W = 16: once; W = 8: twice; W = 4: four times
      vf lo, hi;
      i4_to_vf(p + j, lo, hi);
      for (int r = 0; r < R; ++r) {
        const float* xr = x + r * K + k + j;
        acc[r][0] += lo * load(xr);
        acc[r][hi_chain] += hi * load(xr + kRun / 2);
      }
    }
  }
}

template <int R, int C>
ALWAYS_INLINE vf chains_sum(const vf (&acc)[C]) {
  vf t = acc[0];
  for (int c = 1; c < C; ++c) t += acc[c];
  return t;
}

struct Args {
  const float* x;  // (R, K) fp32
  const void* w;
  const c10::Half* scales;  // (N, K / G) or null
  const float* bias;        // (N,) or null
  float* y;                 // (R, N)
  int64_t K, N, G, row_bytes;
};

// The partial sums of one group [k0, k0 + G) into part (zeroed here).
template <Fmt F, int R, int C = kChains<R>>
ALWAYS_INLINE void group_dot(const Args& a, const uint8_t* row, int64_t k0, vf (&part)[R][C]) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) part[r][c] = vf{};
  if constexpr (F == Fmt::I4) dot_span_i4<R>(row, a.x, a.K, k0, k0 + a.G, part);
  else dot_span<F, R>(row, a.x, a.K, k0, k0 + a.G, part);
}

template <Fmt F, int R>
void one_output(const Args& a, int64_t o) {
  constexpr int C = kChains<R>;
  const auto* row = static_cast<const uint8_t*>(a.w) + o * a.row_bytes;
  vf total[R][2] = {};  // scaled group sums, alternating between two chains
  if (!a.scales) {  // dense 16-bit floats
    vf acc[R][C] = {};
    dot_span<F, R>(row, a.x, a.K, 0, a.K, acc);
    for (int r = 0; r < R; ++r) total[r][0] = chains_sum<R, C>(acc[r]);
  } else {
    const c10::Half* s = a.scales + o * (a.K / a.G);
    const int64_t ng = a.K / a.G;
    vf part[R][C];
    int64_t g = 0;
    for (; g + 2 <= ng; g += 2) {
      for (int h = 0; h < 2; ++h) {
        group_dot<F, R>(a, row, (g + h) * a.G, part);
        const float sg = static_cast<float>(s[g + h]);
        for (int r = 0; r < R; ++r) total[r][h] += chains_sum<R, C>(part[r]) * sg;
      }
    }
    if (g < ng) {
      group_dot<F, R>(a, row, g * a.G, part);
      const float sg = static_cast<float>(s[g]);
      for (int r = 0; r < R; ++r) total[r][0] += chains_sum<R, C>(part[r]) * sg;
    }
  }
  for (int r = 0; r < R; ++r) a.y[r * a.N + o] = hsum(total[r][0] + total[r][1]) + (a.bias ? a.bias[o] : 0.0f);
}

#if defined(__AVX512BF16__)
// bf16 x times bf16 weights with vdpbf16ps: each instruction multiplies 32 pairs of bf16 exactly (an 8-bit by
// 8-bit significand product fits fp32) and adds them, two per lane, into 16 fp32 sums; no conversion of
// the weights at all. The result differs from the fp32-arithmetic path only in the order of the sums
// (and in flushing denormal products to zero). Where it applies: x already bf16, i.e. a bf16 model.
constexpr int kPair = 32;  // bf16 values a vdpbf16ps reads from each operand
constexpr int64_t kBf16DotXBytes = 16 << 10;  // x's rows of a K block: half of L1, beside the weight stream
constexpr int64_t kBf16DotOutBlock = 64;      // outputs walked together block by block of K
// The weight stream is prefetched ahead (simd.h): in one pass over the rows kWeightAhead bytes on (rows are
// contiguous, so it runs on into the next row), in blocks of K one row on (the next output's same block,
// which is read next). Weights loaded memory-mapped sit on 4 KiB pages, where the hardware prefetcher
// stops at every page boundary.

// Four chains of sums per row whatever R: a row's result is bitwise the same in any batch (and 4 x 4
// accumulators still fit the 32 registers). One call runs k in [kb, ke) of one weight row, a multiple of
// C * kPair from kb: the chains start from zero at kb == 0 and are carried in `carry` (R * C vectors)
// between the blocks of a row; the block that ends at K adds the masked rest and writes y. Blocks in
// order give each chain the same sums in the same order as one pass over the row.
template <int R, int C = 4>
void bf16dot_block(const uint16_t* x, const uint16_t* row, const float* bias, float* y, int64_t K, int64_t N,
                   int64_t o, int64_t kb, int64_t ke, __m512* carry, int64_t prefetch_to) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = kb == 0 ? _mm512_setzero_ps() : carry[r * C + c];
  const int64_t main_end = std::min(ke, K / (C * kPair) * (C * kPair));
  int64_t k = kb;
  for (; k < main_end; k += C * kPair) {
    for (int c = 0; c < C; ++c) {
      prefetch_weights_at(row + k + c * kPair, prefetch_to);
      const __m512bh w = (__m512bh)_mm512_loadu_si512(row + k + c * kPair);
      for (int r = 0; r < R; ++r)
        acc[r][c] = _mm512_dpbf16_ps(acc[r][c], w, (__m512bh)_mm512_loadu_si512(x + r * K + k + c * kPair));
    }
  }
  if (ke < K) {
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) carry[r * C + c] = acc[r][c];
    return;
  }
  for (; k < K; k += kPair) {  // the rest, the last vector masked (zeros contribute nothing)
    const __mmask32 m = K - k >= kPair ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
    const __m512bh w = (__m512bh)_mm512_maskz_loadu_epi16(m, row + k);
    for (int r = 0; r < R; ++r)
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w, (__m512bh)_mm512_maskz_loadu_epi16(m, x + r * K + k));
  }
  for (int r = 0; r < R; ++r) {
    __m512 t = acc[r][0];
    for (int c = 1; c < C; ++c) t = _mm512_add_ps(t, acc[r][c]);
    y[r * N + o] = _mm512_reduce_add_ps(t) + (bias ? bias[o] : 0.0f);
  }
}

void bf16dot_group(int64_t rows, const uint16_t* x, const uint16_t* row, const float* bias, float* y, int64_t K,
                   int64_t N, int64_t o, int64_t kb, int64_t ke, __m512* carry, int64_t prefetch_to) {
  switch (rows) {
    case 1: bf16dot_block<1>(x, row, bias, y, K, N, o, kb, ke, carry, prefetch_to); break;
    case 2: bf16dot_block<2>(x, row, bias, y, K, N, o, kb, ke, carry, prefetch_to); break;
    case 3: bf16dot_block<3>(x, row, bias, y, K, N, o, kb, ke, carry, prefetch_to); break;
    default: bf16dot_block<4>(x, row, bias, y, K, N, o, kb, ke, carry, prefetch_to); break;
  }
}

constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
#endif

}  // namespace

namespace jambalab {

bool bf16dot_native() { return kBf16Dot; }

Bf16Dot::Bf16Dot(const uint16_t* x, int64_t R, int64_t K) : x_(x), R_(R), K_(K) {
  if constexpr (!kBf16Dot) widened_.emplace(x, R, K);
}

void Bf16Dot::outputs(const uint16_t* w, const float* bias, float* y, int64_t N, int64_t lo, int64_t hi) const {
  if (widened_) {
    widened_->outputs(w, bias, y, N, lo, hi);
    return;
  }
#if defined(__AVX512BF16__)
  const uint16_t* x = x_;
  const int64_t R = R_, K = K_;
  constexpr int64_t kStep = 4 * kPair;
  const int64_t block = kBf16DotXBytes / (2 * R) / kStep * kStep;  // K values of x's rows that fit in L1
  if (R >= 2 && R <= kMaxRows && K > block) {
    // 2-4 rows whose x does not fit in L1: each block of outputs is walked in blocks of K, x's block
    // staying in L1 while the weights stream, the next output's same block (the next read) prefetched.
    // On Falcon-Mamba-7B-shaped in_proj (16384 x 4096) 4 rows read at 0.80 of 1 row's rate, against
    // 0.61-0.73 in one pass over each row (docs/decode_step.md).
    std::vector<__m512> carry(kBf16DotOutBlock * R * 4);
    outputs_by_k_blocks(lo, hi, K, block, kBf16DotOutBlock, [&](int64_t o, int64_t i, int64_t kb, int64_t ke) {
      bf16dot_group(R, x, w + o * K, bias, y, K, N, o, kb, ke, carry.data() + i * R * 4, 2 * K);
    });
    return;
  }
  // Each output's weight row serves the rows in groups of kMaxRows, while it is still in L1 / L2: the
  // weights come from memory once for any R.
  __m512 unused[kMaxRows * 4];
  for (int64_t o = lo; o < hi; ++o) {
    for (int64_t g = 0; g < R; g += kMaxRows)
      bf16dot_group(std::min<int64_t>(kMaxRows, R - g), x + g * K, w + o * K, bias, y + g * N, K, N, o, 0, K, unused,
                    kWeightAhead);
  }
#endif
}

}  // namespace jambalab

namespace {

template <Fmt F, int R>
void gemv_rows(const Args& a) {
  // Each task reads >= ~64 KiB of weights: smaller ones cost more in the fork than they save.
  const int64_t grain = std::max<int64_t>(4, 65536 / std::max<int64_t>(1, a.row_bytes));
  at::parallel_for(0, a.N, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t o = lo; o < hi; ++o) one_output<F, R>(a, o);
  });
}

template <Fmt F>
void gemv_dispatch_rows(const Args& a, int64_t R) {
  switch (R) {
    case 1: gemv_rows<F, 1>(a); break;
    case 2: gemv_rows<F, 2>(a); break;
    case 3: gemv_rows<F, 3>(a); break;
    default: gemv_rows<F, 4>(a); break;
  }
}

Fmt format_of(const at::Tensor& w) {
  switch (w.scalar_type()) {
    case at::kBFloat16: return Fmt::BF16;
    case at::kHalf: return Fmt::F16;
    case at::kChar: return Fmt::I8;
    case at::kByte: return Fmt::I4;
    default: TORCH_CHECK(false, "wgemv: weight must be bf16, fp16, int8 or uint8 (4-bit), got ", w.scalar_type());
  }
}

// K, the in_features, of a weight of this format ((N, K/2) bytes for 4-bit).
int64_t in_features(const at::Tensor& w, Fmt f) { return f == Fmt::I4 ? 2 * w.size(1) : w.size(1); }

void check_weight(const char* op, const at::Tensor& w, const std::optional<at::Tensor>& scales, int64_t G, Fmt f) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), op, ": weight must be contiguous 2-D, got ", w.sizes());
  const int64_t N = w.size(0), K = in_features(w, f);
  const bool quantized = f == Fmt::I8 || f == Fmt::I4;
  TORCH_CHECK(quantized == scales.has_value(), op, ": scales go with int8 / 4-bit weights and only with them");
  if (!quantized) return;
  TORCH_CHECK(G >= 1 && K % G == 0, op, ": group size ", G, " does not divide in_features ", K);
  TORCH_CHECK(f != Fmt::I4 || G % kRun == 0, op, ": 4-bit group size must be a multiple of ", kRun, ", got ", G);
  TORCH_CHECK(scales->scalar_type() == at::kHalf && scales->is_contiguous() && scales->dim() == 2 &&
                  scales->size(0) == N && scales->size(1) == K / G,
              op, ": scales must be contiguous fp16 (", N, ", ", K / G, "), got ", scales->sizes(), " ",
              scales->scalar_type());
}

}  // namespace

namespace jambalab {

at::Tensor wgemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales, int64_t G,
                 const std::optional<at::Tensor>& bias) {
  const Fmt f = format_of(weight);
  check_weight("wgemv", weight, scales, G, f);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "wgemv: x must be contiguous fp32 or bf16 (R, K), got ", x.sizes(), " ", x.scalar_type());
  const int64_t R = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(in_features(weight, f) == K, "wgemv: x ", x.sizes(), " and weight ", weight.sizes(), " disagree on K");
  const bool bf16dot = f == Fmt::BF16 && x.scalar_type() == at::kBFloat16;
  const int max_rows = bf16dot ? kBf16DotRows : kMaxRows;
  TORCH_CHECK(R >= 1 && R <= max_rows, "wgemv: 1 to ", max_rows, " rows, got ", R);
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "wgemv: bias must be contiguous float32 (N,)");
  }
  if (bf16dot) {
    at::Tensor y = at::empty({R, N}, x.options().dtype(at::kFloat));
    const float* b = bias ? bias->data_ptr<float>() : nullptr;
    const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
    const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<c10::BFloat16>());
    float* yp = y.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(4, 65536 / std::max<int64_t>(1, 2 * K));
    const Bf16Dot rows(xp, R, K);
    at::parallel_for(0, N, grain, [&](int64_t lo, int64_t hi) { rows.outputs(wp, b, yp, N, lo, hi); });
    return y.to(at::kBFloat16);
  }
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  at::Tensor y = at::empty({R, N}, xf.options());
  const Args a{xf.data_ptr<float>(),
               weight.data_ptr(),
               scales ? scales->data_ptr<c10::Half>() : nullptr,
               bias ? bias->data_ptr<float>() : nullptr,
               y.data_ptr<float>(),
               K,
               N,
               scales ? G : K,
               weight.size(1) * static_cast<int64_t>(weight.element_size())};
  switch (f) {
    case Fmt::BF16: gemv_dispatch_rows<Fmt::BF16>(a, R); break;
    case Fmt::F16: gemv_dispatch_rows<Fmt::F16>(a, R); break;
    case Fmt::I8: gemv_dispatch_rows<Fmt::I8>(a, R); break;
    case Fmt::I4: gemv_dispatch_rows<Fmt::I4>(a, R); break;
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// Rows [lo, hi) of an int8 / 4-bit weight, dequantized to a dense (hi - lo, K) fp32 or bf16 tile.
at::Tensor dequant(const at::Tensor& weight, const at::Tensor& scales, int64_t G, int64_t lo, int64_t hi,
                   at::ScalarType dtype) {
  const Fmt f = format_of(weight);
  TORCH_CHECK(f == Fmt::I8 || f == Fmt::I4, "dequant: weight must be int8 or uint8 (4-bit), got ", weight.scalar_type());
  check_weight("dequant", weight, scales, G, f);
  TORCH_CHECK(0 <= lo && lo <= hi && hi <= weight.size(0), "dequant: rows [", lo, ", ", hi, ") outside ", weight.size(0));
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequant: fp32 or bf16 output, got ", dtype);
  const int64_t K = in_features(weight, f), rb = weight.size(1), ng = K / G;
  at::Tensor out = at::empty({hi - lo, K}, weight.options().dtype(dtype));
  const auto* wp = static_cast<const uint8_t*>(weight.data_ptr());
  const c10::Half* sp = scales.data_ptr<c10::Half>();
  at::parallel_for(lo, hi, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K)), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(K);
    for (int64_t o = r0; o < r1; ++o) {
      const uint8_t* row = wp + o * rb;
      if (f == Fmt::I8) {
        for (int64_t g = 0; g < ng; ++g) {
          const float s = static_cast<float>(sp[o * ng + g]);
          for (int64_t k = g * G; k < (g + 1) * G; ++k) buf[k] = static_cast<float>(static_cast<int8_t>(row[k])) * s;
        }
      } else {  // runs of 32 (G is a multiple of 32): 16 bytes, k 0-15 in the low nibbles, 16-31 in the high
        const int64_t runs_per_group = G / kRun;  // a counter, not run * 32 / G: a division a run was half the time
        for (int64_t run = 0, g = 0, left = runs_per_group; run < K / kRun; ++run) {
          const float s = static_cast<float>(sp[o * ng + g]);
          if (--left == 0) ++g, left = runs_per_group;
          const uint8_t* p = row + run * kRun / 2;
          float* d = buf.data() + run * kRun;
#if defined(__AVX512F__)
          // 16 bytes -> 16 low and 16 high nibbles as int32, minus 8, times s: the scalar loop below
          // (which GCC does not vectorise) ran 4-bit tiles at a quarter of int8's rate.
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), nib = _mm_set1_epi8(0x0F);
          const __m512i eight = _mm512_set1_epi32(8);
          const __m512 sv = _mm512_set1_ps(s);
          const __m512i lo = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(v, nib)), eight);
          const __m512i hi = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), nib)), eight);
          _mm512_storeu_ps(d, _mm512_mul_ps(_mm512_cvtepi32_ps(lo), sv));
          _mm512_storeu_ps(d + kRun / 2, _mm512_mul_ps(_mm512_cvtepi32_ps(hi), sv));
#else
          for (int j = 0; j < kRun / 2; ++j) {
            d[j] = static_cast<float>((p[j] & 0xF) - 8) * s;
            d[j + kRun / 2] = static_cast<float>((p[j] >> 4) - 8) * s;
          }
#endif
        }
      }
      if (dtype == at::kFloat) {
        std::memcpy(out.data_ptr<float>() + (o - lo) * K, buf.data(), K * sizeof(float));
      } else {
        c10::BFloat16* dst = out.data_ptr<c10::BFloat16>() + (o - lo) * K;
        for (int64_t k = 0; k < K; ++k) dst[k] = c10::BFloat16(buf[k]);  // round to nearest even
      }
    }
  });
  return out;
}

}  // namespace jambalab

TORCH_LIBRARY_FRAGMENT(jambalab_kernels, m) {
  m.def("wgemv(Tensor x, Tensor weight, Tensor? scales, int group_size, Tensor? bias) -> Tensor");
  m.def("dequant(Tensor weight, Tensor scales, int group_size, int lo, int hi, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(jambalab_kernels, CPU, m) {
  m.impl("wgemv", &jambalab::wgemv);
  m.impl("dequant", &jambalab::dequant);
}
