// Decode GEMV over int8 / 4-bit weights with the activations quantized to int8 too, beside its
// pure-PyTorch twin (jambalab/ops/quant_ref.py: quantize_act_ref, wgemv_a8_ref):
// - wgemv_a8: y (R, N) = x (R, K) @ W^T (+ bias) for R <= 4 rows, W int8 (N, K) or 4-bit (N, K/2)
//   with fp16 scales (N, K/G), in qgemv.cpp's formats. Each row of x is quantized in blocks of 32:
//   d = max|x| / 127, q = round(x / d) in [-127, 127] (llama.cpp's Q8_0 activations); then
//     y[r, o] = sum_b d_x[r, b] * s[o, g(b)] * sum_{k in b} q_x[r, k] * q_w[o, k]
//   with the inner sums exact in int32. K and G are multiples of 32.
// - a8_native: whether this build has the VNNI kernel (else the portable loop, slower than
//   qgemv.cpp's wgemv; jambalab/ops/lowp.py then keeps wgemv by default).
//
// Legend: R rows of x, K in_features, N out_features, G group size, b a block of 32 values of K,
// c a chunk of 64 (two blocks: one 512-bit register of int8).
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
#include <vector>

#include "simd.h"  // ALWAYS_INLINE

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxRows = 4;
constexpr int kBlock = 32;  // values per activation scale (and the 4-bit packing run)
constexpr int kChunk = 64;  // weights per step: two blocks
constexpr int kLanes = 16;  // int32 sums per chunk, 8 per block: lane i sums the products 4i .. 4i + 3

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kNative = true;
#else
constexpr bool kNative = false;
#endif

// x (R, K) as int8 blocks, padded with zeros to whole chunks, and what the kernel needs per chunk.
struct QuantX {
  int64_t R, K, chunks;
  std::vector<int8_t> q;   // (R, chunks * 64)
  std::vector<float> dv;   // (R, chunks, 16): each block's scale d in its 8 lanes (0 past K)
  std::vector<int32_t> off;  // (R, chunks, 16): -8 * the sum of each lane's 4 q's (4-bit weights' offset)
};

// One block of 32 (n <= 32 values): its scale, and q into out.
float quantize_block(const float* x, int n, int8_t* out) {
  float amax = 0.0f;
  for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  for (int i = 0; i < n; ++i) {
    const float v = std::nearbyint(x[i] * id);  // round half to even, as torch.round
    out[i] = static_cast<int8_t>(std::clamp(v, -127.0f, 127.0f));
  }
  return d;
}

QuantX quantize_x(const float* x, int64_t R, int64_t K) {
  QuantX a{R, K, (K + kChunk - 1) / kChunk, {}, {}, {}};
  const int64_t Kp = a.chunks * kChunk;
  a.q.assign(R * Kp, 0);
  a.dv.assign(R * a.chunks * kLanes, 0.0f);
  a.off.assign(R * a.chunks * kLanes, 0);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t k = 0; k < K; k += kBlock) {
      int8_t* q = a.q.data() + r * Kp + k;
      const float d = quantize_block(x + r * K + k, static_cast<int>(std::min<int64_t>(kBlock, K - k)), q);
      const int64_t lane0 = (r * a.chunks + k / kChunk) * kLanes + (k % kChunk) / 4;
      for (int l = 0; l < kBlock / 4; ++l) {
        a.dv[lane0 + l] = d;
        a.off[lane0 + l] = -8 * (q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3]);
      }
    }
  }
  return a;
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

// The scale of the group holding weight k (0 past K).
float scale_at(const Args& a, int64_t o, int64_t k) {
  return k < a.K ? static_cast<float>(a.scales[o * (a.K / a.G) + k / a.G]) : 0.0f;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// The group scales of the two blocks of a chunk, as 8 + 8 lanes of floats: the two fp16 bit patterns
// in one 32-bit word, spread by vpermw, converted by vcvtph2ps. (Found by counting blocks, not by k / G:
// two 64-bit divisions a chunk were most of the first version's time.)
struct ChunkScales {
  const uint16_t* s;  // this output's scales, (K / G,) fp16 bits
  int64_t per_group;  // blocks a group
  int64_t g = 0, left;  // the next block's group, blocks of it left

  ChunkScales(const c10::Half* row, int64_t G) : s(reinterpret_cast<const uint16_t*>(row)), per_group(G / kBlock), left(G / kBlock) {}

  uint32_t next_block() {
    const uint32_t bits = s[g];
    if (--left == 0) { ++g; left = per_group; }
    return bits;
  }

  __m512 next(bool two_blocks) {
    const uint32_t lo = next_block(), hi = two_blocks ? next_block() : 0u;
    const __m256i idx = _mm256_setr_epi16(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m256i pair = _mm256_castsi128_si256(_mm_cvtsi32_si128(static_cast<int>(lo | hi << 16)));
    return _mm512_cvtph_ps(_mm256_permutexvar_epi16(idx, pair));
  }
};

// The 64 weights of the chunk at k as bytes in k order (n <= 64 of them; the rest zero): int8 as stored,
// or 4-bit as the unsigned nibbles 0..15 (16 bytes a run of 32: low nibbles k0..k0+15, high k0+16..k0+31).
template <bool Int4>
ALWAYS_INLINE __m512i chunk_weights(const uint8_t* row, int64_t k, int64_t n) {
  if constexpr (!Int4) {
    if (n == kChunk) return _mm512_loadu_si512(row + k);
    return _mm512_maskz_loadu_epi8((__mmask64(1) << n) - 1, row + k);
  } else {
    const __m256i v = n == kChunk ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k / 2))
                                  : _mm256_maskz_loadu_epi8((__mmask32(1) << (n / 2)) - 1, row + k / 2);
    const __m256i nib = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
    const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);  // 128-bit lanes: lo0 lo1 hi0 hi1
    return _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));              // lo0 hi0 lo1 hi1: k order
  }
}

// The int32 sums of chunk c for row r: 16 lanes, lanes 0-7 the first block's, 8-15 the second's.
template <bool Int4>
ALWAYS_INLINE __m512i chunk_sums(const QuantX& x, int64_t r, int64_t c, __m512i w, __m512i aw, __mmask64 neg) {
  const __m512i q = _mm512_loadu_si512(x.q.data() + r * x.chunks * kChunk + c * kChunk);
  if constexpr (Int4) {  // sum u * q - 8 * sum q: the offset is the accumulator's start
    return _mm512_dpbusd_epi32(_mm512_loadu_si512(x.off.data() + (r * x.chunks + c) * kLanes), w, q);
  } else {  // vpdpbusd takes unsigned x signed bytes: |w| times q with w's sign
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, _mm512_mask_sub_epi8(q, neg, _mm512_setzero_si512(), q));
  }
}

// acc[r] += (the sums of chunk c, as floats) * (the block scales of x) [* the group scales s].
template <int R, bool Int4, bool Scaled>
ALWAYS_INLINE void chunk_step(const QuantX& x, const uint8_t* row, int64_t K, int64_t c, __m512 s, __m512 (&acc)[R]) {
  const int64_t k = c * kChunk;
  const __m512i w = chunk_weights<Int4>(row, k, std::min<int64_t>(kChunk, K - k));
  __m512i aw = w;
  __mmask64 neg = 0;
  if constexpr (!Int4) {
    aw = _mm512_abs_epi8(w);
    neg = _mm512_movepi8_mask(w);
  }
  for (int r = 0; r < R; ++r) {
    const __m512i isum = chunk_sums<Int4>(x, r, c, w, aw, neg);
    __m512 d = _mm512_loadu_ps(x.dv.data() + (r * x.chunks + c) * kLanes);
    if constexpr (Scaled) d = _mm512_mul_ps(d, s);
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), d, acc[r]);
  }
}

// Groups of 32 (or an odd number of 32s): the group scale changes inside a chunk, so each chunk's
// block scales are multiplied by its two group scales.
template <int R, bool Int4>
void sums_by_chunk(const Args& a, const uint8_t* row, int64_t o, __m512 (&acc)[R]) {
  ChunkScales scales(a.scales + o * (a.K / a.G), a.G);
  for (int64_t c = 0; c < a.x->chunks; ++c) {
    const __m512 s = scales.next(a.K - c * kChunk >= kChunk);
    chunk_step<R, Int4, true>(*a.x, row, a.K, c, s, acc);
  }
}

// Groups of a multiple of 64: whole chunks, so the group scale multiplies the group's sum once. One
// row of x alternates two accumulators: one FMA chain (4 cycles a step) would be the bound.
template <int R, bool Int4>
void sums_by_group(const Args& a, const uint8_t* row, int64_t o, __m512 (&acc)[R]) {
  constexpr int C = R == 1 ? 2 : 1;
  const int64_t per_group = a.G / kChunk, ng = a.K / a.G;
  const c10::Half* s = a.scales + o * ng;
  for (int64_t g = 0; g < ng; ++g) {
    __m512 part[C][R];
    for (int i = 0; i < C; ++i)
      for (int r = 0; r < R; ++r) part[i][r] = _mm512_setzero_ps();
    int64_t c = g * per_group;
    const int64_t end = c + per_group;
    for (; c + C <= end; c += C)
      for (int i = 0; i < C; ++i) chunk_step<R, Int4, false>(*a.x, row, a.K, c + i, __m512{}, part[i]);
    for (; c < end; ++c) chunk_step<R, Int4, false>(*a.x, row, a.K, c, __m512{}, part[0]);
    const __m512 sg = _mm512_set1_ps(static_cast<float>(s[g]));
    for (int r = 0; r < R; ++r) {
      __m512 t = part[0][r];
      for (int i = 1; i < C; ++i) t = _mm512_add_ps(t, part[i][r]);
      acc[r] = _mm512_fmadd_ps(t, sg, acc[r]);
    }
  }
}

template <int R, bool Int4>
void one_output(const Args& a, int64_t o) {
  const uint8_t* row = a.w + o * a.row_bytes;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  if (a.G % kChunk == 0) sums_by_group<R, Int4>(a, row, o, acc);
  else sums_by_chunk<R, Int4>(a, row, o, acc);
  for (int r = 0; r < R; ++r) a.y[r * a.N + o] = _mm512_reduce_add_ps(acc[r]) + (a.bias ? a.bias[o] : 0.0f);
}
#else
// Portable: the same sums, a block at a time, in plain loops.
template <int R, bool Int4>
void one_output(const Args& a, int64_t o) {
  const QuantX& x = *a.x;
  const int64_t Kp = x.chunks * kChunk;
  const uint8_t* row = a.w + o * a.row_bytes;
  float acc[R] = {};
  for (int64_t k = 0; k < a.K; k += kBlock) {
    int32_t wq[kBlock];
    for (int j = 0; j < kBlock; ++j) {
      wq[j] = a.int4 ? ((row[k / 2 + (j & 15)] >> (j & 16 ? 4 : 0)) & 0xF) - 8 : static_cast<int8_t>(row[k + j]);
    }
    const float s = scale_at(a, o, k);
    for (int r = 0; r < R; ++r) {
      const int8_t* q = x.q.data() + r * Kp + k;
      int32_t isum = 0;
      for (int j = 0; j < kBlock; ++j) isum += wq[j] * q[j];
      const float d = x.dv[(r * x.chunks + k / kChunk) * kLanes + (k % kChunk) / 4];
      acc[r] += static_cast<float>(isum) * (d * s);
    }
  }
  for (int r = 0; r < R; ++r) a.y[r * a.N + o] = acc[r] + (a.bias ? a.bias[o] : 0.0f);
}
#endif

template <int R>
void gemv_rows(const Args& a) {
  const int64_t grain = std::max<int64_t>(4, 65536 / std::max<int64_t>(1, a.row_bytes));  // >= ~64 KiB a task
  at::parallel_for(0, a.N, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t o = lo; o < hi; ++o) a.int4 ? one_output<R, true>(a, o) : one_output<R, false>(a, o);
  });
}

}  // namespace

namespace jambalab {

at::Tensor wgemv_a8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t G,
                    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.scalar_type() == at::kChar || weight.scalar_type() == at::kByte,
              "wgemv_a8: weight must be int8 or uint8 (4-bit), got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "wgemv_a8: weight must be contiguous 2-D, got ",
              weight.sizes());
  const bool int4 = weight.scalar_type() == at::kByte;
  const int64_t N = weight.size(0), K = int4 ? 2 * weight.size(1) : weight.size(1);
  TORCH_CHECK(K % kBlock == 0 && G >= kBlock && G % kBlock == 0 && K % G == 0, "wgemv_a8: in_features ", K,
              " and group size ", G, " must be multiples of ", kBlock, ", the group size dividing in_features");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == N && scales.size(1) == K / G,
              "wgemv_a8: scales must be contiguous fp16 (", N, ", ", K / G, "), got ", scales.sizes());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) == K &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "wgemv_a8: x must be contiguous fp32 or bf16 (R, ", K, "), got ", x.sizes(), " ", x.scalar_type());
  const int64_t R = x.size(0);
  TORCH_CHECK(R >= 1 && R <= kMaxRows, "wgemv_a8: 1 to ", kMaxRows, " rows, got ", R);
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "wgemv_a8: bias must be contiguous float32 (N,)");
  }
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  const QuantX qx = quantize_x(xf.data_ptr<float>(), R, K);
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

bool a8_native() { return kNative; }

}  // namespace jambalab

TORCH_LIBRARY_FRAGMENT(jambalab_kernels, m) {
  m.def("wgemv_a8(Tensor x, Tensor weight, Tensor scales, int group_size, Tensor? bias) -> Tensor");
  m.def("a8_native() -> bool", &jambalab::a8_native);
}

TORCH_LIBRARY_IMPL(jambalab_kernels, CPU, m) { m.impl("wgemv_a8", &jambalab::wgemv_a8); }
