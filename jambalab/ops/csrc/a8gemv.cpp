// Decode GEMV over int8 / 4-bit weights with the activations quantized to int8 too, beside its
// pure-PyTorch twin (jambalab/ops/quant_ref.py: quantize_act_ref, wgemv_a8_ref):
// - wgemv_a8: y (R, N) = x (R, K) @ W^T (+ bias) for R <= 4 rows, W int8 (N, K) or 4-bit (N, K/2)
//   with fp16 scales (N, K/G), in qgemv.cpp's formats. Each row of x is quantized in blocks of 32:
//   d = max|x| / 127, q = round(x / d) in [-127, 127] (llama.cpp's Q8_0 activations); then
//     y[r, o] = sum_b d_x[r, b] * s[o, g(b)] * sum_{k in b} q_x[r, k] * q_w[o, k]
//   with the inner sums exact in int32. K and G are multiples of 32.
// - act_round: x rounded that way, as fp32 or bf16 (the prefill GEMM's input in this mode);
// - a8_native: whether this build has a SIMD kernel (AVX512-VNNI vpdpbusd, or AVX2 vpmaddubsw), not
//   the portable loop.
//
// Legend: R rows of x, K in_features, N out_features, G group size, b a block of 32 values of K.
//
// Why: wgemv converts every weight to fp32 in registers, ~4 instructions per 16 weights, and runs at
// ~10 G weights/s a core: below the memory bandwidth for int8 and 4-bit. vpdpbusd multiplies 64 int8
// pairs and adds them in fours into 16 int32 lanes in one instruction, so the weights are never
// converted; what is left per 64 weights is one int -> float convert and one FMA per row.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "simd.h"  // ALWAYS_INLINE

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxRows = 4;
constexpr int kBlock = 32;  // values per activation scale (and the 4-bit packing run)
constexpr int kLanes = 16;  // int32 sums per step: lane i sums the products of bytes 4i .. 4i + 3

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kNative = true;  // the VNNI kernel (its step layout of x is built only then)
#else
constexpr bool kNative = false;
#endif
#if defined(__AVX2__)
constexpr bool kSimd = true;  // a8_native: VNNI or AVX2, not the portable loop
#else
constexpr bool kSimd = kNative;
#endif

// One step of the kernel: the weights one iteration reads, and how they lie in its registers.
//   int8:  64 weights, one register in k order: lanes 0-7 block 0, 8-15 block 1.
//   4-bit: 128 weights = 64 bytes = four runs; one register's low nibbles hold k 0-15, 32-47, 64-79,
//          96-111 and its high nibbles k 16-31, 48-63, 80-95, 112-127 (the Q4_0 run order), so
//          x is laid out the same way (two registers) and lanes 4j .. 4j + 3 of both are block j.
struct Step {
  int weights, blocks;
  bool int4;
  int lanes_per_block() const { return kLanes / blocks; }
  // The k (within the step) of byte p of the step's x registers (p < weights).
  int k_of(int p) const {
    if (!int4) return p;
    const int half = p / 64, i = p % 64;  // register 0: low nibbles, 1: high
    return (i / 16) * kBlock + half * 16 + i % 16;
  }
};

constexpr Step step_of(bool int4) { return int4 ? Step{128, 4, true} : Step{64, 2, false}; }

// x (R, K) as int8 blocks of 32: q and d in k order (the portable loop's), and, for the VNNI kernel,
// q in step layout (padded with zeros to whole steps), each lane's block scale, and for 4-bit the
// offset -8 * (the sum of the lane's q's over both registers) that turns unsigned nibbles u into u - 8.
// For int8 weights the step layout holds q + 128 as unsigned bytes (q ^ 0x80): vpdpbusd multiplies
// unsigned by signed bytes, and sum (q + 128) w - 128 sum w = sum q w exactly in int32 (StepW).
struct QuantX {
  int64_t R, K, steps;
  Step step;
  std::vector<int8_t> q;       // (R, K)
  std::vector<float> d;        // (R, K / 32)
  std::vector<int8_t> qs;      // (R, steps, step.weights); int8 weights: the bytes of q + 128
  std::vector<float> dv;       // (R, steps, 16), 0 past K
  std::vector<int32_t> off;    // (R, steps, 16), 4-bit only
  // (AVX2 without VNNI, 4-bit: qs, dv and off hold pair_layout's instead)
};

// One block of 32 values: its scale, and q into out.
float quantize_block(const float* x, int8_t* out) {
  float amax = 0.0f;
  for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  for (int i = 0; i < kBlock; ++i) {
    const float v = std::nearbyint(x[i] * id);  // round half to even, as torch.round
    out[i] = static_cast<int8_t>(std::clamp(v, -127.0f, 127.0f));
  }
  return d;
}

// The AVX2 4-bit kernel's layout of x (AVX2 without VNNI): a pair of blocks (2p, 2p + 1) is 64 weights,
// one 32-byte load whose low nibbles hold k 0-15 of both blocks and whose high nibbles k 16-31, so x is
// laid out the same way in two registers: qs (R, K / 64, 64) = [x_2p[0:16], x_2p+1[0:16], x_2p[16:32],
// x_2p+1[16:32]]. vpmaddwd's lane i sums bytes 4i .. 4i + 3 of both: lanes 0-3 are block 2p, 4-7 block
// 2p + 1; dv (R, K / 64, 8) holds each lane's block scale, off (R, K / 64, 8) -8 x the sum of its q's.
// A last single block (K / 32 odd) is not in it: the kernel takes it from q in k order.
constexpr int kPairLanes = 8;

void pair_layout(QuantX& a) {
  const int64_t R = a.R, K = a.K, pairs = K / 64;
  a.qs.assign(R * pairs * 64, 0);
  a.dv.assign(R * pairs * kPairLanes, 0.0f);
  a.off.assign(R * pairs * kPairLanes, 0);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t p = 0; p < pairs; ++p) {
      const int8_t* q = a.q.data() + r * K + p * 64;  // blocks 2p and 2p + 1 in k order
      int8_t* dst = a.qs.data() + (r * pairs + p) * 64;
      for (int i = 0; i < 16; ++i) {
        dst[i] = q[i];
        dst[16 + i] = q[32 + i];
        dst[32 + i] = q[16 + i];
        dst[48 + i] = q[48 + i];
      }
      for (int l = 0; l < kPairLanes; ++l) {
        int32_t sum = 0;
        for (int j = 4 * l; j < 4 * l + 4; ++j) sum += dst[j] + dst[32 + j];
        const int64_t at = (r * pairs + p) * kPairLanes + l;
        a.off[at] = -8 * sum;
        a.dv[at] = a.d[r * K / kBlock + 2 * p + l / 4];
      }
    }
  }
}

QuantX quantize_x(const float* x, int64_t R, int64_t K, bool int4) {
  const Step st = step_of(int4);
  QuantX a{R, K, (K + st.weights - 1) / st.weights, st, {}, {}, {}, {}, {}};
  a.q.resize(R * K);
  a.d.resize(R * K / kBlock);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t b = 0; b < K / kBlock; ++b) a.d[r * K / kBlock + b] = quantize_block(x + r * K + b * kBlock, a.q.data() + r * K + b * kBlock);
  if (!kNative) {
    if (kSimd && int4) pair_layout(a);
    return a;
  }
  a.qs.assign(R * a.steps * st.weights, 0);
  a.dv.assign(R * a.steps * kLanes, 0.0f);
  if (int4) a.off.assign(R * a.steps * kLanes, 0);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t s = 0; s < a.steps; ++s) {
      int8_t* qs = a.qs.data() + (r * a.steps + s) * st.weights;
      for (int p = 0; p < st.weights; ++p) {
        const int64_t k = s * st.weights + st.k_of(p);
        const int8_t v = k < K ? a.q[r * K + k] : 0;
        qs[p] = int4 ? v : static_cast<int8_t>(static_cast<uint8_t>(v) ^ 0x80u);
      }
      for (int l = 0; l < kLanes; ++l) {
        const int64_t k = s * st.weights + st.k_of(4 * l);  // the first value of lane l (register 0)
        const int64_t at = (r * a.steps + s) * kLanes + l;
        a.dv[at] = k < K ? a.d[r * K / kBlock + k / kBlock] : 0.0f;
        if (!int4) continue;
        int32_t sum = 0;
        for (int p = 4 * l; p < 4 * l + 4; ++p) sum += qs[p] + qs[64 + p];
        a.off[at] = -8 * sum;
      }
    }
  }
  return a;
}

// wgemv_a8's and wgemm_a8's checks of the weight, its scales and the bias (`op` names the op in the
// messages); the weight's kind and shape.
struct QuantShape {
  bool int4;
  int64_t N, K;
};

QuantShape check_quant_args(const char* op, const at::Tensor& weight, const at::Tensor& scales, int64_t G,
                            const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.scalar_type() == at::kChar || weight.scalar_type() == at::kByte, op,
              ": weight must be int8 or uint8 (4-bit), got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), op, ": weight must be contiguous 2-D, got ", weight.sizes());
  const bool int4 = weight.scalar_type() == at::kByte;
  const int64_t N = weight.size(0), K = int4 ? 2 * weight.size(1) : weight.size(1);
  TORCH_CHECK(K % kBlock == 0 && G >= kBlock && G % kBlock == 0 && K % G == 0, op, ": in_features ", K,
              " and group size ", G, " must be multiples of ", kBlock, ", the group size dividing in_features");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == N && scales.size(1) == K / G,
              op, ": scales must be contiguous fp16 (", N, ", ", K / G, "), got ", scales.sizes());
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, op,
                ": bias must be contiguous float32 (N,)");
  }
  return {int4, N, K};
}

struct Args {
  const QuantX* x;
  const uint8_t* w;
  const c10::Half* scales;  // (N, K / G)
  const float* bias;        // (N,) or null
  float* y;                 // (R, N)
  int64_t K, N, G, row_bytes;
  bool int4;
};

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// The group scales of a step's blocks, spread over their lanes. Groups of 32 (one scale a block, the
// 4-bit default): 16 scales are converted at once (one vcvtph2ps) and each step's Blocks of them spread
// by one vpermps. Larger groups: the fp16 bit patterns gathered into one 64-bit word, spread by vpermw,
// converted by vcvtph2ps. (Found by counting blocks, not by k / G: two 64-bit divisions a step were
// most of the first version's time.)
// StepScales' lane indices, made once: spread[l] = l's block in a step; pick[q][l] = the scale lane l takes,
// of 16 converted at once, in the q-th step they serve.
template <int Blocks>
struct SpreadIndex {
  static constexpr int kSteps16 = kLanes / Blocks;
  alignas(32) int16_t spread[kLanes] = {};
  alignas(64) int32_t pick[kSteps16][kLanes] = {};
  constexpr SpreadIndex() {
    for (int l = 0; l < kLanes; ++l) spread[l] = static_cast<int16_t>(l / (kLanes / Blocks));
    for (int q = 0; q < kSteps16; ++q)
      for (int l = 0; l < kLanes; ++l) pick[q][l] = Blocks * q + l / (kLanes / Blocks);
  }
};
template <int Blocks>
constexpr SpreadIndex<Blocks> kSpreadIndex{};

template <int Blocks>
struct StepScales {
  static constexpr int kSteps16 = kLanes / Blocks;  // steps served by one conversion of 16 scales
  const uint16_t* s = nullptr;  // this output's scales, (K / G,) fp16 bits
  int64_t per_group = 1, left = 1, g = 0, blocks_left = 0;  // blocks a group; of the current one; blocks before K
  __m512 sixteen = _mm512_setzero_ps();
  int q16 = kSteps16;

  StepScales() = default;
  StepScales(const c10::Half* row, int64_t G, int64_t K)
      : s(reinterpret_cast<const uint16_t*>(row)), per_group(G / kBlock), left(G / kBlock), blocks_left(K / kBlock) {}

  __m512 next() {
    if (per_group == 1) {  // groups of 32: the next scales lie in order
      if (q16 == kSteps16) {
        const int64_t n = std::min<int64_t>(kLanes, blocks_left);
        const __m256i bits = n == kLanes ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + g))
                                         : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), s + g);
        sixteen = _mm512_cvtph_ps(bits);  // past K: zeros
        g += n;
        blocks_left -= n;
        q16 = 0;
      }
      return _mm512_permutexvar_ps(_mm512_load_si512(kSpreadIndex<Blocks>.pick[q16++]), sixteen);
    }
    uint64_t bits = 0;
    for (int j = 0; j < Blocks && blocks_left > 0; ++j, --blocks_left) {
      bits |= uint64_t(s[g]) << (16 * j);
      if (--left == 0) { ++g; left = per_group; }
    }
    const __m256i v = _mm256_castsi128_si256(_mm_cvtsi64_si128(static_cast<long long>(bits)));
    const __m256i spread = _mm256_load_si256(reinterpret_cast<const __m256i*>(kSpreadIndex<Blocks>.spread));
    return _mm512_cvtph_ps(_mm256_permutexvar_epi16(spread, v));
  }
};

// QuantX's step layout seen from one format: where row r's x of step s lies, the step size a
// compile-time constant (the addressing is most of a step's scalar work once several rows share each
// weight load).
template <bool Int4>
struct XRows {
  static constexpr int64_t kWeights = step_of(Int4).weights;
  const int8_t* qs;
  const float* dv;
  const int32_t* off;
  int64_t K, steps, full;  // steps a row; steps with every weight present
  explicit XRows(const QuantX& x)
      : qs(x.qs.data()), dv(x.dv.data()), off(Int4 ? x.off.data() : nullptr), K(x.K), steps(x.steps),
        full(x.K / kWeights) {}
  const int8_t* q(int64_t r, int64_t s) const { return qs + (r * steps + s) * kWeights; }
  const float* d(int64_t r, int64_t s) const { return dv + (r * steps + s) * kLanes; }
  const int32_t* o(int64_t r, int64_t s) const { return off + (r * steps + s) * kLanes; }
};

// One output's weights of step s, loaded once for every row of x. int8: the weights w, and -128 times
// the sum of each lane's four (QuantX holds q + 128); 4-bit: the low and the high nibbles.
template <bool Int4>
struct StepW {
  __m512i a, b;
};

template <bool Int4>
ALWAYS_INLINE StepW<Int4> load_step(const XRows<Int4>& xr, const uint8_t* row, int64_t s) {
  const int64_t n = s < xr.full ? XRows<Int4>::kWeights : xr.K - s * XRows<Int4>::kWeights;  // weights present
  const uint8_t* p = row + s * 64;
  if constexpr (Int4) {
    const __m512i v = n == 128 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8((__mmask64(1) << (n / 2)) - 1, p);
    const __m512i nib = _mm512_set1_epi8(0x0F);
    return {_mm512_and_si512(v, nib), _mm512_and_si512(_mm512_srli_epi16(v, 4), nib)};
  } else {
    const __m512i w = n == 64 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8((__mmask64(1) << n) - 1, p);
    const __m512i sum128 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(static_cast<char>(0x80)), w);
    return {w, _mm512_sub_epi32(_mm512_setzero_si512(), sum128)};
  }
}

// The int32 sums of step s for row r (16 lanes). int8: (q + 128) times w, from -128 sum w; 4-bit: the
// nibbles u times q, both registers into one accumulator that starts at the offset -8 * sum q.
template <bool Int4>
ALWAYS_INLINE __m512i row_sums(const XRows<Int4>& xr, const StepW<Int4>& w, int64_t r, int64_t s) {
  const int8_t* q = xr.q(r, s);
  if constexpr (Int4) {
    const __m512i acc = _mm512_dpbusd_epi32(_mm512_loadu_si512(xr.o(r, s)), w.a, _mm512_loadu_si512(q));
    return _mm512_dpbusd_epi32(acc, w.b, _mm512_loadu_si512(q + 64));
  } else {
    return _mm512_dpbusd_epi32(w.b, _mm512_loadu_si512(q), w.a);
  }
}

// acc[j][r] += (step s's sums of output j and row r, as floats) * (row r's lanes' block scales)
// [* output j's group scales gs[j]]. Each (j, r) adds in the same order whatever J is, so an output's
// result does not depend on the outputs computed beside it.
template <int J, int R, bool Int4, bool Scaled>
ALWAYS_INLINE void step_acc(const XRows<Int4>& xr, const uint8_t* const (&rows)[J], int64_t s,
                            const __m512 (&gs)[J], __m512 (&acc)[J][R]) {
  StepW<Int4> w[J];
  for (int j = 0; j < J; ++j) {
    prefetch_weights(rows[j] + s * 64);  // a step reads 64 bytes of each output's row
    w[j] = load_step<Int4>(xr, rows[j], s);
  }
  for (int r = 0; r < R; ++r) {
    const __m512 d = _mm512_loadu_ps(xr.d(r, s));
    for (int j = 0; j < J; ++j) {
      const __m512 dj = Scaled ? _mm512_mul_ps(d, gs[j]) : d;
      acc[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(row_sums<Int4>(xr, w[j], r, s)), dj, acc[j][r]);
    }
  }
}

// Groups smaller than a step (or not a whole number of steps): each step's block scales are multiplied
// by its blocks' group scales.
template <int J, int R, bool Int4>
void sums_by_step(const Args& a, const uint8_t* const (&rows)[J], int64_t o, __m512 (&acc)[J][R]) {
  const QuantX& x = *a.x;
  StepScales<Int4 ? 4 : 2> scales[J];
  for (int j = 0; j < J; ++j) scales[j] = StepScales<Int4 ? 4 : 2>(a.scales + (o + j) * (a.K / a.G), a.G, a.K);
  const XRows<Int4> xr(x);
  for (int64_t s = 0; s < x.steps; ++s) {
    __m512 gs[J];
    for (int j = 0; j < J; ++j) gs[j] = scales[j].next();
    step_acc<J, R, Int4, true>(xr, rows, s, gs, acc);
  }
}

// Groups of whole steps: the group scale multiplies the group's sum once. One chain of FMAs a row and
// output, whatever R and J (one row once alternated two, and so summed in another order than in a
// batch; a chain of 4 cycles a step is ~50 GB/s of int8 a core, above the memory's rate).
template <int J, int R, bool Int4>
void sums_by_group(const Args& a, const uint8_t* const (&rows)[J], int64_t o, __m512 (&acc)[J][R]) {
  const QuantX& x = *a.x;
  const int64_t per_group = a.G / x.step.weights, ng = a.K / a.G;
  const c10::Half* sc = a.scales + o * ng;
  const XRows<Int4> xr(x);
  const __m512 none[J] = {};
  for (int64_t g = 0; g < ng; ++g) {
    __m512 part[J][R];
    for (int j = 0; j < J; ++j)
      for (int r = 0; r < R; ++r) part[j][r] = _mm512_setzero_ps();
    for (int64_t s = g * per_group; s < (g + 1) * per_group; ++s) step_acc<J, R, Int4, false>(xr, rows, s, none, part);
    for (int j = 0; j < J; ++j) {
      const __m512 sg = _mm512_set1_ps(static_cast<float>(sc[j * ng + g]));
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_fmadd_ps(part[j][r], sg, acc[j][r]);
    }
  }
}

// Outputs o .. o + J - 1 for the R rows of x. J outputs side by side are J weight streams in flight at
// once and share each load of x.
template <int J, int R, bool Int4>
void outputs_block(const Args& a, int64_t o) {
  const uint8_t* rows[J];
  for (int j = 0; j < J; ++j) rows[j] = a.w + (o + j) * a.row_bytes;
  __m512 acc[J][R];
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
  if (a.G % a.x->step.weights == 0) sums_by_group<J, R, Int4>(a, rows, o, acc);
  else sums_by_step<J, R, Int4>(a, rows, o, acc);
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) a.y[r * a.N + o + j] = _mm512_reduce_add_ps(acc[j][r]) + (a.bias ? a.bias[o + j] : 0.0f);
}

// How many outputs one pass computes side by side. int8 with 2-4 rows: 4. One output at a time, 4
// rows' arithmetic per 64-byte step left one weight stream with few misses in flight (a standalone
// copy from DRAM, one core: 12 ns a step, 5.6 with 4 outputs); on 16384 x 4096, 2 threads, 4 rows read
// 19-21 GB/s against 15-17.5. One row reads at the memory's rate with one output (two read 23 against
// 26-30 GB/s). 4-bit: one, which 2 and 4 outputs did not beat (their group scales take more
// registers; 2 rows 16-20 GB/s and 4 rows 10-12 with 1 or 2).
template <int R, bool Int4>
constexpr int kOutputsAtOnce = Int4 || R == 1 ? 1 : 4;

template <int R, bool Int4>
void outputs_span(const Args& a, int64_t lo, int64_t hi) {
  constexpr int J = kOutputsAtOnce<R, Int4>;
  int64_t o = lo;
  for (; o + J <= hi; o += J) outputs_block<J, R, Int4>(a, o);
  for (; o < hi; ++o) outputs_block<1, R, Int4>(a, o);
}
#elif defined(__AVX2__)
// AVX2 without VNNI: per block of 32, vpmaddubsw (unsigned x signed bytes, pairs into int16) and
// vpmaddwd by ones (pairs into int32), with |w| and q carrying w's sign (llama.cpp's AVX2 Q8_0 way;
// |w| * q <= 127 * 127, so a pair's int16 sum cannot saturate).
template <bool Int4>
ALWAYS_INLINE __m256i block_weights(const uint8_t* row, int64_t k) {  // 32 int8 weights in k order
  if constexpr (Int4) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2));
    const __m128i nib = _mm_set1_epi8(0x0F);
    const __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), nib), _mm_and_si128(v, nib));
    return _mm256_sub_epi8(u, _mm256_set1_epi8(8));
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
  }
}

// One block's products of signed weights w and q (32 each): |w| times q carrying w's sign, into 8 int32
// sums of 4.
ALWAYS_INLINE __m256i block_isum(__m256i w, __m256i q) {
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(q, w));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

// The 8 lanes of v summed in a fixed order (a row's result does not depend on the rows beside it).
ALWAYS_INLINE float hsum8(__m256 v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  return ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
}

// 4-bit on AVX2: a pair of blocks a step (pair_layout). The unsigned nibbles go into vpmaddubsw as they
// are (|pair| <= 2 * 15 * 127), the low and high registers' products add in int16 (<= 7620), one vpmaddwd
// by ones makes int32 sums of 4, and the nibbles' offset of 8 comes back as -8 x the sum of q (off): no
// sign tricks and no -8 per weight, which the block-at-a-time loop (one_output) spends on every block.
// Groups of 32: each step's two scales are converted at once; groups of a multiple of 64: a group's sum is
// scaled once; other groups (a multiple of 32 that straddles pairs): each block's scale looked up.
template <int R>
void four_bit_output(const Args& a, int64_t o) {
  const QuantX& x = *a.x;
  const uint8_t* row = a.w + o * a.row_bytes;
  const int64_t K = a.K, pairs = K / 64, ng = K / a.G;
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(a.scales + o * ng);
  const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  __m256 acc[R], part[R];
  for (int r = 0; r < R; ++r) acc[r] = part[r] = _mm256_setzero_ps();
  const int64_t pairs_per_group = a.G % 64 == 0 ? a.G / 64 : 0;
  for (int64_t p = 0; p < pairs; ++p) {
    prefetch_weights(row + p * 32);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + p * 32));
    const __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
    __m256 sv = _mm256_set1_ps(1.0f);
    if (a.G == kBlock) {
      uint32_t two;
      std::memcpy(&two, sc + 2 * p, 4);
      sv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(two)))), spread);
    } else if (!pairs_per_group) {
      const float s0 = _cvtsh_ss(sc[(2 * p * kBlock) / a.G]), s1 = _cvtsh_ss(sc[((2 * p + 1) * kBlock) / a.G]);
      sv = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0));
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* q = x.qs.data() + (r * pairs + p) * 64;
      const __m256i prod = _mm256_add_epi16(
          _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))),
          _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32))));
      const __m256i isum = _mm256_add_epi32(_mm256_madd_epi16(prod, ones),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.off.data() + (r * pairs + p) * kPairLanes)));
      const __m256 d = _mm256_loadu_ps(x.dv.data() + (r * pairs + p) * kPairLanes);
      if (pairs_per_group) {
        part[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), d, part[r]);
      } else {
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, sv), acc[r]);
      }
    }
    if (pairs_per_group && (p + 1) % pairs_per_group == 0) {
      const __m256 sg = _mm256_set1_ps(_cvtsh_ss(sc[(p * 64) / a.G]));
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm256_fmadd_ps(part[r], sg, acc[r]);
        part[r] = _mm256_setzero_ps();
      }
    }
  }
  if (K % 64) {  // the last block alone, from q in k order, as one_output takes every block
    const int64_t b = K / kBlock - 1;
    const __m256i w = block_weights<true>(row, b * kBlock);
    const float s = _cvtsh_ss(sc[(b * kBlock) / a.G]);
    for (int r = 0; r < R; ++r) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + r * K + b * kBlock));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_isum(w, q)), _mm256_set1_ps(x.d[r * (K / kBlock) + b] * s),
                               acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) a.y[r * a.N + o] = hsum8(acc[r]) + (a.bias ? a.bias[o] : 0.0f);
}

template <int R, bool Int4>
void one_output(const Args& a, int64_t o) {
  const QuantX& x = *a.x;
  const uint8_t* row = a.w + o * a.row_bytes;
  const int64_t nb = a.K / kBlock, per_group = a.G / kBlock;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.K / a.G; ++g) {
    const float s = _cvtsh_ss(a.scales[o * (a.K / a.G) + g].x);
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      constexpr int kBytes = Int4 ? kBlock / 2 : kBlock;  // a block's weight bytes
      if ((b * kBytes) % 64 == 0) prefetch_weights(row + b * kBytes);  // once a cache line, as the VNNI kernel
      const __m256i w = block_weights<Int4>(row, b * kBlock);
      for (int r = 0; r < R; ++r) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + r * a.K + b * kBlock));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_isum(w, q)), _mm256_set1_ps(x.d[r * nb + b] * s), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) a.y[r * a.N + o] = hsum8(acc[r]) + (a.bias ? a.bias[o] : 0.0f);
}
#else
// Portable: the same sums, a block at a time, in plain loops over q in k order.
template <int R, bool Int4>
void one_output(const Args& a, int64_t o) {
  const QuantX& x = *a.x;
  const uint8_t* row = a.w + o * a.row_bytes;
  float acc[R] = {};
  for (int64_t k = 0; k < a.K; k += kBlock) {
    int32_t wq[kBlock];
    for (int j = 0; j < kBlock; ++j) {
      wq[j] = Int4 ? ((row[k / 2 + (j & 15)] >> (j & 16 ? 4 : 0)) & 0xF) - 8 : static_cast<int8_t>(row[k + j]);
    }
    const float s = static_cast<float>(a.scales[o * (a.K / a.G) + k / a.G]);
    for (int r = 0; r < R; ++r) {
      const int8_t* q = x.q.data() + r * a.K + k;
      int32_t isum = 0;
      for (int j = 0; j < kBlock; ++j) isum += wq[j] * q[j];
      acc[r] += static_cast<float>(isum) * (x.d[r * a.K / kBlock + k / kBlock] * s);
    }
  }
  for (int r = 0; r < R; ++r) a.y[r * a.N + o] = acc[r] + (a.bias ? a.bias[o] : 0.0f);
}
#endif

#if !(defined(__AVX512VNNI__) && defined(__AVX512BW__))
// The AVX2 and portable kernels: one output at a time (4-bit on AVX2: four_bit_output).
template <int R, bool Int4>
void outputs_span(const Args& a, int64_t lo, int64_t hi) {
#if defined(__AVX2__)
  if constexpr (Int4) {
    for (int64_t o = lo; o < hi; ++o) four_bit_output<R>(a, o);
    return;
  }
#endif
  for (int64_t o = lo; o < hi; ++o) one_output<R, Int4>(a, o);
}
#endif

template <int R>
void outputs_range(const Args& a, int64_t lo, int64_t hi) {
  a.int4 ? outputs_span<R, true>(a, lo, hi) : outputs_span<R, false>(a, lo, hi);
}

template <int R>
void gemv_rows(const Args& a) {
  const int64_t grain = std::max<int64_t>(4, 65536 / std::max<int64_t>(1, a.row_bytes));  // >= ~64 KiB a task
  at::parallel_for(0, a.N, grain, [&](int64_t lo, int64_t hi) { outputs_range<R>(a, lo, hi); });
}

// wgemm_a8: the prefill GEMM of the int8-activation mode, y (M, N) = x (M, K) @ W^T (+ bias), computing
// what wgemv_a8 computes (x quantized in blocks of 32 exactly as it does; the int32 block sums exact), with
// the fp32 sums in another order. wgemv_a8 puts K in the lanes, so every block of every row and output
// pays an int -> float conversion and a scaled add; here 16 outputs share the lanes: each tile of 32
// outputs is repacked (per block of 32 values, per quad of k, 64 bytes = 16 outputs x 4 k), 4 bytes of a
// row of x are broadcast, and a block's conversion and scaled add serve 16 outputs. The tile stays in L2
// while the rows stream through it, in groups of 4. Without VNNI (AVX2), the same tiles, 8 outputs a
// register, multiplied with vpmaddubsw (below).
#if defined(__AVX2__)
constexpr int kTileOut = 32;  // outputs per tile: two registers of 16 (VNNI), four of 8 (AVX2)
constexpr int kQuads = kBlock / 4;

// all M rows of x: int8 weights take q + 128 (unsigned) under VNNI and q itself on AVX2; 4-bit ones q and
// its block sums
struct GemmX {
  int64_t M, K, nb;
  std::vector<uint8_t> q;   // (M, K)
  std::vector<float> d;     // (M, nb)
  std::vector<int32_t> qsum;  // (M, nb), 4-bit only
};

GemmX gemm_x(const float* x, int64_t M, int64_t K, bool int4) {
  GemmX g{M, K, K / kBlock, std::vector<uint8_t>(M * K), std::vector<float>(M * (K / kBlock)), {}};
  if (int4) g.qsum.resize(M * g.nb);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K)), [&](int64_t lo, int64_t hi) {
    int8_t q[kBlock];
    for (int64_t m = lo; m < hi; ++m) {
      for (int64_t b = 0; b < g.nb; ++b) {
        g.d[m * g.nb + b] = quantize_block(x + m * K + b * kBlock, q);
        int32_t sum = 0;
        for (int i = 0; i < kBlock; ++i) {
          sum += q[i];
          const bool offset = !int4 && kNative;  // vpdpbusd's unsigned operand: q + 128
          g.q[m * K + b * kBlock + i] = offset ? static_cast<uint8_t>(q[i]) ^ 0x80u : static_cast<uint8_t>(q[i]);
        }
        if (int4) g.qsum[m * g.nb + b] = sum;
      }
    }
  });
  return g;
}

// One tile: outputs n0 .. n0 + 31 (zeros past N): w (nb, kQuads, 32, 4) bytes, int8 signed or 4-bit
// unsigned nibbles 0..15; for int8 under VNNI, 128 x each block's weight sum (nb, 32); the scales (ng, 32).
// A quad's 128 bytes are two 16-output registers or four 8-output ones.
struct Tile {
  std::vector<uint8_t> w;
  std::vector<int32_t> wsum128;
  std::vector<float> sc;
};

void repack(const uint8_t* w, const c10::Half* scales, int64_t N, int64_t K, int64_t G, bool int4, int64_t n0, Tile& t) {
  const int64_t nb = K / kBlock, ng = K / G, row_bytes = int4 ? K / 2 : K;
  t.w.assign(nb * kBlock * kTileOut, 0);
  t.wsum128.assign(int4 || !kNative ? 0 : nb * kTileOut, 0);
  t.sc.assign(ng * kTileOut, 0.0f);
  uint32_t* quads = reinterpret_cast<uint32_t*>(t.w.data());  // (nb, kQuads, 2, 16) quads of 4 k
  for (int o = 0; o < kTileOut && n0 + o < N; ++o) {
    const uint8_t* row = w + (n0 + o) * row_bytes;
    const int j = o / 16, lane = o % 16;
    for (int64_t b = 0; b < nb; ++b) {
      uint32_t* dst = quads + (b * kQuads * 2 + j) * 16 + lane;  // quad qd at dst[qd * 32]
      if (int4) {  // run b (16 bytes): byte i holds k = i (low nibble) and k = 16 + i (high nibble)
        for (int qd = 0; qd < kQuads / 2; ++qd) {
          uint32_t u;
          std::memcpy(&u, row + b * 16 + 4 * qd, 4);
          dst[qd * 32] = u & 0x0F0F0F0Fu;
          dst[(qd + kQuads / 2) * 32] = (u >> 4) & 0x0F0F0F0Fu;
        }
      } else {
        int32_t sum = 0;
        for (int qd = 0; qd < kQuads; ++qd) std::memcpy(dst + qd * 32, row + b * kBlock + 4 * qd, 4);
        if (!kNative) continue;
        for (int i = 0; i < kBlock; ++i) sum += static_cast<int8_t>(row[b * kBlock + i]);
        t.wsum128[(b * 2 + j) * 16 + lane] = 128 * sum;
      }
    }
    for (int64_t g = 0; g < ng; ++g) t.sc[(g * 2 + j) * 16 + lane] = static_cast<float>(scales[(n0 + o) * ng + g]);
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
template <int R, bool Int4>
void tile_rows(const GemmX& x, int64_t m0, const Tile& t, int64_t G, const float* bias, float* y, int64_t N,
               int64_t n0) {
  const int64_t K = x.K, nb = x.nb, per_group = G / kBlock, ng = K / G;
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m512 gacc[R][2];
    for (int r = 0; r < R; ++r) gacc[r][0] = gacc[r][1] = _mm512_setzero_ps();
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      __m512i s[R][2];
      for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm512_setzero_si512();
      const uint8_t* wb = t.w.data() + b * kQuads * 2 * 64;
      for (int qd = 0; qd < kQuads; ++qd) {
        const __m512i w0 = _mm512_loadu_si512(wb + (qd * 2) * 64), w1 = _mm512_loadu_si512(wb + (qd * 2 + 1) * 64);
        for (int r = 0; r < R; ++r) {
          int32_t four;
          std::memcpy(&four, x.q.data() + (m0 + r) * K + b * kBlock + qd * 4, 4);
          const __m512i xb = _mm512_set1_epi32(four);
          if constexpr (Int4) {  // unsigned nibbles times signed q
            s[r][0] = _mm512_dpbusd_epi32(s[r][0], w0, xb);
            s[r][1] = _mm512_dpbusd_epi32(s[r][1], w1, xb);
          } else {  // q + 128 times signed weights
            s[r][0] = _mm512_dpbusd_epi32(s[r][0], xb, w0);
            s[r][1] = _mm512_dpbusd_epi32(s[r][1], xb, w1);
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 d = _mm512_set1_ps(x.d[(m0 + r) * nb + b]);
        for (int j = 0; j < 2; ++j) {
          const __m512i off = Int4 ? _mm512_set1_epi32(8 * x.qsum[(m0 + r) * nb + b])
                                   : _mm512_loadu_si512(t.wsum128.data() + (b * 2 + j) * 16);
          gacc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s[r][j], off)), d, gacc[r][j]);
        }
      }
    }
    for (int j = 0; j < 2; ++j) {
      const __m512 sc = _mm512_loadu_ps(t.sc.data() + (g * 2 + j) * 16);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_fmadd_ps(gacc[r][j], sc, acc[r][j]);
    }
  }
  for (int j = 0; j < 2; ++j) {
    const int64_t lo = n0 + 16 * j, n = std::clamp<int64_t>(N - lo, 0, 16);
    if (n == 0) continue;
    const __mmask16 m = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias + lo) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + (m0 + r) * N + lo, m, _mm512_add_ps(acc[r][j], bv));
  }
}
#else
// AVX2: a tile's 32 outputs in two passes of 16 (two registers of 8; all 32 at once would need 48 of the 16
// ymm registers with 4 rows). 4-bit: vpmaddubsw multiplies the unsigned nibbles by q in pairs into int16
// (|pair| <= 2 * 15 * 127), a block's 8 quads add in int16 (<= 30480: exact), and one vpmaddwd by ones
// makes the int32 sums of 4. int8: |w| times q carrying w's sign (llama.cpp's AVX2 Q8_0 way; a pair
// <= 2 * 128 * 127), into int32 every quad.
template <int R, bool Int4>
void tile_half(const GemmX& x, int64_t m0, const Tile& t, int64_t G, const float* bias, float* y, int64_t N,
               int64_t n0, int half) {
  constexpr int V = 2;  // registers of 8 outputs a pass
  const int64_t K = x.K, nb = x.nb, per_group = G / kBlock, ng = K / G;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][V];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m256 gacc[R][V];
    for (int r = 0; r < R; ++r) gacc[r][0] = gacc[r][1] = _mm256_setzero_ps();
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      __m256i s[R][V];  // 4-bit: int16 pair sums; int8: int32 sums of 4
      for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm256_setzero_si256();
      const uint8_t* wb = t.w.data() + b * kQuads * kTileOut * 4 + half * V * 32;
      for (int qd = 0; qd < kQuads; ++qd) {
        __m256i w[V];
        for (int v = 0; v < V; ++v) w[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + qd * kTileOut * 4 + v * 32));
        for (int r = 0; r < R; ++r) {
          int32_t four;
          std::memcpy(&four, x.q.data() + (m0 + r) * K + b * kBlock + qd * 4, 4);
          const __m256i xb = _mm256_set1_epi32(four);
          for (int v = 0; v < V; ++v) {
            if constexpr (Int4) {
              s[r][v] = _mm256_add_epi16(s[r][v], _mm256_maddubs_epi16(w[v], xb));
            } else {
              const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w[v], w[v]), _mm256_sign_epi8(xb, w[v]));
              s[r][v] = _mm256_add_epi32(s[r][v], _mm256_madd_epi16(pairs, ones));
            }
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m256 d = _mm256_set1_ps(x.d[(m0 + r) * nb + b]);
        for (int v = 0; v < V; ++v) {
          const __m256i isum = Int4 ? _mm256_sub_epi32(_mm256_madd_epi16(s[r][v], ones),
                                                       _mm256_set1_epi32(8 * x.qsum[(m0 + r) * nb + b]))
                                    : s[r][v];
          gacc[r][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), d, gacc[r][v]);
        }
      }
    }
    for (int v = 0; v < V; ++v) {
      const __m256 sc = _mm256_loadu_ps(t.sc.data() + g * kTileOut + (half * V + v) * 8);
      for (int r = 0; r < R; ++r) acc[r][v] = _mm256_fmadd_ps(gacc[r][v], sc, acc[r][v]);
    }
  }
  for (int v = 0; v < V; ++v) {
    const int64_t lo = n0 + (half * V + v) * 8, n = std::clamp<int64_t>(N - lo, 0, 8);
    for (int r = 0; r < R; ++r) {
      alignas(32) float out[8];
      _mm256_store_ps(out, acc[r][v]);
      for (int i = 0; i < n; ++i) y[(m0 + r) * N + lo + i] = out[i] + (bias ? bias[lo + i] : 0.0f);
    }
  }
}

template <int R, bool Int4>
void tile_rows(const GemmX& x, int64_t m0, const Tile& t, int64_t G, const float* bias, float* y, int64_t N,
               int64_t n0) {
  for (int half = 0; half < 2 && n0 + 16 * half < N; ++half) tile_half<R, Int4>(x, m0, t, G, bias, y, N, n0, half);
}
#endif
#endif

}  // namespace

namespace jambalab {

bool wgemm_a8_available() { return kSimd; }  // VNNI or AVX2 (the portable loop has none)

at::Tensor wgemm_a8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t G,
                    const std::optional<at::Tensor>& bias) {
#if defined(__AVX2__)
  const auto [int4, N, K] = check_quant_args("wgemm_a8", weight, scales, G, bias);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "wgemm_a8: x must be fp32 or bf16 (M, ", K, "), got ", x.sizes(), " ", x.scalar_type());
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = x.size(0);
  const GemmX gx = gemm_x(xf.data_ptr<float>(), M, K, int4);
  at::Tensor y = at::empty({M, N}, xf.options());
  const auto* wp = static_cast<const uint8_t*>(weight.data_ptr());
  const c10::Half* sp = scales.data_ptr<c10::Half>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (N + kTileOut - 1) / kTileOut;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    Tile t;
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t n0 = ti * kTileOut;
      repack(wp, sp, N, K, G, int4, n0, t);
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) int4 ? tile_rows<4, true>(gx, m, t, G, bp, yp, N, n0) : tile_rows<4, false>(gx, m, t, G, bp, yp, N, n0);
      for (; m < M; ++m) int4 ? tile_rows<1, true>(gx, m, t, G, bp, yp, N, n0) : tile_rows<1, false>(gx, m, t, G, bp, yp, N, n0);
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
#else
  TORCH_CHECK(false, "wgemm_a8: this build has neither AVX512-VNNI nor AVX2");
#endif
}


struct A8Rows::Impl {
  QuantX x;
};

A8Rows::A8Rows(const float* x, int64_t R, int64_t K, bool int4) : impl_(new Impl{quantize_x(x, R, K, int4)}) {
  TORCH_CHECK(R >= 1 && R <= kMaxRows && K % kBlock == 0, "A8Rows: 1 to ", kMaxRows, " rows of a multiple of ",
              kBlock, " values, got ", R, " x ", K);
}
A8Rows::~A8Rows() = default;
A8Rows::A8Rows(A8Rows&&) noexcept = default;
A8Rows& A8Rows::operator=(A8Rows&&) noexcept = default;
int64_t A8Rows::rows() const { return impl_->x.R; }
bool A8Rows::int4() const { return impl_->x.step.int4; }

void A8Rows::outputs(const void* w, const c10::Half* scales, int64_t G, const float* bias, float* y, int64_t N,
                     int64_t lo, int64_t hi) const {
  const QuantX& x = impl_->x;
  const Args a{&x, static_cast<const uint8_t*>(w), scales, bias, y, x.K, N, G, x.step.int4 ? x.K / 2 : x.K,
               x.step.int4};
  switch (x.R) {
    case 1: outputs_range<1>(a, lo, hi); break;
    case 2: outputs_range<2>(a, lo, hi); break;
    case 3: outputs_range<3>(a, lo, hi); break;
    default: outputs_range<4>(a, lo, hi); break;
  }
}

at::Tensor wgemv_a8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t G,
                    const std::optional<at::Tensor>& bias) {
  const auto [int4, N, K] = check_quant_args("wgemv_a8", weight, scales, G, bias);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) == K &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "wgemv_a8: x must be contiguous fp32 or bf16 (R, ", K, "), got ", x.sizes(), " ", x.scalar_type());
  const int64_t R = x.size(0);
  TORCH_CHECK(R >= 1 && R <= kMaxRows, "wgemv_a8: 1 to ", kMaxRows, " rows, got ", R);
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  const QuantX qx = quantize_x(xf.data_ptr<float>(), R, K, int4);
  at::Tensor y = at::empty({R, N}, xf.options());
  const Args a{&qx, static_cast<const uint8_t*>(weight.data_ptr()), scales.data_ptr<c10::Half>(),
               bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), K, N, G, weight.size(1), int4};
  switch (R) {
    case 1: gemv_rows<1>(a); break;
    case 2: gemv_rows<2>(a); break;
    case 3: gemv_rows<3>(a); break;
    default: gemv_rows<4>(a); break;
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// x (M, K) rounded as wgemv_a8 rounds it (q * d per block of 32), in fp32 or bf16: what the prefill GEMM
// multiplies in the int8-activation mode. One pass, rows over the threads (the twin, fake_quant_act, is a
// dozen torch ops: a noticeable cost for the MoE's many small per-expert products).
at::Tensor act_round(const at::Tensor& x, at::ScalarType dtype) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % kBlock == 0 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "act_round: x must be contiguous fp32 or bf16 (M, K), K a multiple of ", kBlock, ", got ", x.sizes(), " ",
              x.scalar_type());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "act_round: fp32 or bf16 output, got ", dtype);
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, K}, x.options().dtype(dtype));
  const float* xp = xf.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K)), [&](int64_t lo, int64_t hi) {
    std::vector<float> row(K);
    int8_t q[kBlock];
    for (int64_t m = lo; m < hi; ++m) {
      for (int64_t b = 0; b < K; b += kBlock) {
        const float d = quantize_block(xp + m * K + b, q);
        for (int i = 0; i < kBlock; ++i) row[b + i] = static_cast<float>(q[i]) * d;
      }
      if (dtype == at::kFloat) {
        std::memcpy(out.data_ptr<float>() + m * K, row.data(), K * sizeof(float));
      } else {
        c10::BFloat16* dst = out.data_ptr<c10::BFloat16>() + m * K;
        for (int64_t k = 0; k < K; ++k) dst[k] = c10::BFloat16(row[k]);  // round to nearest even, as .to(bf16)
      }
    }
  });
  return out;
}

bool a8_native() { return kSimd; }

}  // namespace jambalab

TORCH_LIBRARY_FRAGMENT(jambalab_kernels, m) {
  m.def("wgemv_a8(Tensor x, Tensor weight, Tensor scales, int group_size, Tensor? bias) -> Tensor");
  m.def("act_round(Tensor x, ScalarType dtype) -> Tensor");
  m.def("wgemm_a8(Tensor x, Tensor weight, Tensor scales, int group_size, Tensor? bias) -> Tensor");
  m.def("wgemm_a8_available() -> bool", &jambalab::wgemm_a8_available);
  m.def("a8_native() -> bool", &jambalab::a8_native);
}

TORCH_LIBRARY_IMPL(jambalab_kernels, CPU, m) {
  m.impl("wgemv_a8", &jambalab::wgemv_a8);
  m.impl("act_round", &jambalab::act_round);
  m.impl("wgemm_a8", &jambalab::wgemm_a8);
}
