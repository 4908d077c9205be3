// Fused CPU kernels for the Mamba-1 selective scan (forward and backward) and
// the two decode-step ops. Built at first use by jambalab/ops/cpu.py; the
// pure-PyTorch twins live in jambalab/ops/scan_ref.py and conv_ref.py.
//
// Legend: B batch, L length, D d_inner (channels), N d_state, K d_conv,
//         T checkpoint interval (chunk_size), W SIMD lanes, CB channels per
//         block (= V vectors of W lanes).
//
//   h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t      (fp32 state)
//   y_t = (h_t . C_t + D * x_t) * silu(z_t)
//
// Design (see REFERENCE.md, "CPU performance facts"):
// - Activations stay in (B, L, D): a task owns (batch b, CB channels) and walks
//   time; the state is kept as [N][V] vectors over its channels, so the
//   recurrence, the exp and the y = h . C contraction are all vertical SIMD
//   ops (no horizontal sums in the forward).
// - exp is the ceiling (one per state update), so it is a branch-free exp2 on
//   GCC vector types (8-entry table + cubic, ~1.6e-7 relative error), and its
//   overflow guard is hoisted out of the inner loop (DtRange).
// - The state-update loops are bound by the multiply/FMA pipes: every op
//   counts, and helpers are forced inline.
// - The backward walks chunks of T steps in reverse: it recomputes the chunk's
//   states from checkpoints the forward saved every T steps, keeps them (and
//   exp(dt*A)) in a small per-task buffer, then runs the adjoint recurrence.
//   Nothing of size (B, L, D, N) is ever allocated.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <omp.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels.h"
#include "simd.h"  // kVecBytes, W, vf, ALWAYS_INLINE, hsum

namespace {

// ---------------------------------------------------------------- SIMD basics (beyond simd.h)

constexpr int V = W >= 16 ? 1 : 16 / W;  // 16 channels per block: one AVX-512 vector, two AVX2 ones
constexpr int CB = V * W;
constexpr int kMaxN = 64;  // d_state bound for the on-stack state; cpu.py falls back above it

typedef int32_t vi __attribute__((vector_size(kVecBytes)));

constexpr float kLog2e = 1.4426950408889634f;

ALWAYS_INLINE vf splat(float s) { return vf{} + s; }

// max/min as one instruction each (the portable `a < b ? b : a` is a compare and a
// blend); x86 returns the second operand when either is NaN, so NaN inputs stay NaN.
ALWAYS_INLINE vf vmax(vf bound, vf u) {
#if defined(__AVX512F__)
  return _mm512_max_ps(bound, u);
#elif defined(__AVX__)
  return _mm256_max_ps(bound, u);
#else
  return u < bound ? bound : u;
#endif
}

ALWAYS_INLINE vf vmin(vf bound, vf u) {
#if defined(__AVX512F__)
  return _mm512_min_ps(bound, u);
#elif defined(__AVX__)
  return _mm256_min_ps(bound, u);
#else
  return u > bound ? bound : u;
#endif
}

// exp(x) = 2^u with u = x log2(e), split as u = n + j/8 + r, |r| <= 1/16:
//   2^u = 2^n * 2^(j/8) * p(r),  p a minimax cubic (max rel error 1.6e-7 in fp32).
// The 8-entry table needs one permute and leaves 4 multiply/FMA ops per exp
// instead of 7 for a degree-6 polynomial on [-1/2, 1/2]; those pipes bound the scan.
constexpr float kP1 = 6.931472143e-01f, kP2 = 2.402576299e-01f, kP3 = 5.549622179e-02f;
// Adding 1.5 * 2^20 rounds u to a multiple of 1/8 and leaves 8u, as an integer, in
// the low mantissa bits of the sum t (valid for |u| < 2^19).
constexpr float kRound8 = 1572864.0f;
constexpr float kTwoJ8[8] = {0x1p+0f,          0x1.172b84p+0f, 0x1.306fe0p+0f, 0x1.4bfdaep+0f,
                             0x1.6a09e6p+0f,   0x1.8ace54p+0f, 0x1.ae89fap+0f, 0x1.d5818ep+0f};

// bits(2^(n + j/8)) = bits(2^(j/8)) + (n << 23) = table[j] + (bits(t) << 20) when table[j]
// absorbs the j << 20 and bits(kRound8) << 20 that the shift also brings along.
constexpr int32_t exp_table_entry(int j) {
  const uint32_t v = std::bit_cast<uint32_t>(kTwoJ8[j]) - (uint32_t(j) << 20) -
                     (std::bit_cast<uint32_t>(kRound8) << 20);
  return std::bit_cast<int32_t>(v);
}

template <size_t... I>
constexpr vi make_exp_table(std::index_sequence<I...>) {
  return vi{exp_table_entry(I % 8)...};
}
constexpr vi kExpTable = make_exp_table(std::make_index_sequence<W>{});

// table[bits(t) mod 8]; GCC turns the variable shuffle into one vpermd on AVX2/AVX-512.
ALWAYS_INLINE vi exp_table_lookup(vi tbits) {
  if constexpr (W >= 8) {
    return __builtin_shuffle(kExpTable, tbits);  // indices taken mod W; the table repeats every 8
  } else {
    constexpr vi hi = make_exp_table(std::index_sequence<4, 5, 6, 7>{});
    return __builtin_shuffle(kExpTable, hi, tbits);  // two-vector form, indices mod 8
  }
}

// 2^u for u in [-126, 128): the polynomial, table and exponent add of the header.
ALWAYS_INLINE vf exp2_core(vf u) {
  const vf t = u + kRound8;
  const vf r = u - (t - kRound8);
  vf p = splat(kP3);
  p = p * r + kP2;
  p = p * r + kP1;
  p = p * r + 1.0f;
  // GCC vector casts between same-size types reinterpret the bits.
  const vi scale = exp_table_lookup((vi)t) + ((vi)t << 20);
  return p * (vf)scale;
}

// 2^u for any u: clamped to [-126, 127] (2^-126 ~ 1e-38 is as good as zero).
ALWAYS_INLINE vf exp2v(vf u) { return exp2_core(vmin(splat(127.0f), vmax(splat(-126.0f), u))); }

// The scan's decay 2^(dt A log2e): only the lower clamp here, in the hot loop;
// dt was clamped per step so that u <= 127 (see DtRange), which saves ~9%.
ALWAYS_INLINE vf exp2_decay(vf u) { return exp2_core(vmax(splat(-126.0f), u)); }

// Scalar twin of exp2v (same table and polynomial), for the decode step's tail.
ALWAYS_INLINE float exp2s(float u) {
  u = std::min(std::max(u, -126.0f), 127.0f);
  const float t = u + kRound8;
  const float r = u - (t - kRound8);
  const float p = ((kP3 * r + kP2) * r + kP1) * r + 1.0f;
  const uint32_t tb = std::bit_cast<uint32_t>(t);
  const uint32_t scale = static_cast<uint32_t>(exp_table_entry(tb & 7)) + (tb << 20);
  return p * std::bit_cast<float>(scale);
}

ALWAYS_INLINE vf sigmoidv(vf z) { return 1.0f / (1.0f + exp2v(z * -kLog2e)); }

// out[j] += sum of the lanes of rows[j], j < count. With 8 lanes, 8 rows reduce
// together by a transpose-and-add tree (21 ops for 8 sums, not ~10 per sum): the
// backward needs 2 N such sums every step (dB_t, dC_t summed over channels).
#if defined(__AVX__) && !defined(__AVX512F__)
// Slots s0..s7 come out in lane order (s0, s2, s4, s6, s1, s3, s5, s7); add_row_sums
// feeds rows (r0, r4, r1, r5, r2, r6, r3, r7) so that lane j holds sum(r_j).
ALWAYS_INLINE vf pair_halves(vf a, vf b) {  // [a | b] halves, each the sum of its source's halves
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
}
ALWAYS_INLINE vf pair_quarters(vf a, vf b) {
  return __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13) +
         __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
}
ALWAYS_INLINE vf pair_lanes(vf a, vf b) {
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
ALWAYS_INLINE vf tree8(vf s0, vf s1, vf s2, vf s3, vf s4, vf s5, vf s6, vf s7) {
  const vf q0 = pair_quarters(pair_halves(s0, s1), pair_halves(s2, s3));
  const vf q1 = pair_quarters(pair_halves(s4, s5), pair_halves(s6, s7));
  return pair_lanes(q0, q1);
}
#else
ALWAYS_INLINE vf tree8(vf, vf, vf, vf, vf, vf, vf, vf) { return vf{}; }  // unused: W != 8
#endif

ALWAYS_INLINE void add_row_sums(const vf* rows, int64_t count, float* out) {
  int64_t j = 0;
  if constexpr (W == 8) {
    for (; j + 8 <= count; j += 8) {
      const vf* r = rows + j;
      vf acc;
      std::memcpy(&acc, out + j, sizeof acc);
      acc += tree8(r[0], r[4], r[1], r[5], r[2], r[6], r[3], r[7]);
      std::memcpy(out + j, &acc, sizeof acc);
    }
  }
  for (; j < count; ++j) out[j] += hsum(rows[j]);
}

ALWAYS_INLINE float f32(float v) { return v; }
ALWAYS_INLINE float f32(c10::BFloat16 v) { return static_cast<float>(v); }
template <typename T>
ALWAYS_INLINE T from_f32(float v) { return static_cast<T>(v); }  // BFloat16: round to nearest even

// ------------------------------------------------ channel-block loads/stores

// bfloat16 <-> float for whole vectors (GCC left c10's per-element conversions,
// with their NaN branch, as scalar code: bf16 steps ran at half speed).
typedef uint16_t vh __attribute__((vector_size(kVecBytes / 2)));  // W bfloat16 bit patterns
typedef uint32_t vu __attribute__((vector_size(kVecBytes)));

ALWAYS_INLINE vf bf16_to_vf(vh h) { return (vf)(__builtin_convertvector(h, vu) << 16); }

ALWAYS_INLINE vh vf_to_bf16(vf f) {  // round to nearest even, like c10::BFloat16; NaN -> 0x7FC0
  const vu u = (vu)f;
  const vu rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const vu nan = vu{} + 0x7FC0u;
  return __builtin_convertvector((f != f) ? nan : rounded, vh);
}

// A block is CB consecutive channels d0..d0+nc; lanes past nc read as 0 and are
// never written, so a zero lane keeps exp(0 * A) = 1 and a zero state: no NaNs.
template <typename T>
ALWAYS_INLINE void load_block(const T* p, int nc, vf out[V]) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (nc == CB) {
      for (int v = 0; v < V; ++v) {
        vh h;
        std::memcpy(&h, p + v * W, sizeof h);
        out[v] = bf16_to_vf(h);
      }
      return;
    }
  }
  alignas(kVecBytes) float tmp[CB];
  if (nc == CB) {
    for (int c = 0; c < CB; ++c) tmp[c] = f32(p[c]);
  } else {
    for (int c = 0; c < CB; ++c) tmp[c] = c < nc ? f32(p[c]) : 0.0f;
  }
  std::memcpy(out, tmp, sizeof tmp);
}

ALWAYS_INLINE void zero_block(vf out[V]) {
  for (int v = 0; v < V; ++v) out[v] = vf{};
}

template <typename T>
ALWAYS_INLINE void store_block(T* p, int nc, const vf in[V]) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (nc == CB) {
      for (int v = 0; v < V; ++v) {
        const vh h = vf_to_bf16(in[v]);
        std::memcpy(p + v * W, &h, sizeof h);
      }
      return;
    }
  }
  alignas(kVecBytes) float tmp[CB];
  std::memcpy(tmp, in, sizeof tmp);
  if (nc == CB) {
    for (int c = 0; c < CB; ++c) p[c] = from_f32<T>(tmp[c]);
  } else {
    for (int c = 0; c < nc; ++c) p[c] = from_f32<T>(tmp[c]);
  }
}

// (D, N) row-major matrix (state, A, or their grads) <-> [N][V] vectors of the block.
// The transpose costs D*N per task, once, next to L*D*N updates.
ALWAYS_INLINE void gather_dn(const float* m, int64_t d0, int nc, int64_t N, float scale, vf out[][V]) {
  float* o = reinterpret_cast<float*>(out);  // o[n * CB + c]
  for (int64_t n = 0; n < N; ++n)
    for (int c = 0; c < CB; ++c) o[n * CB + c] = (m && c < nc) ? m[(d0 + c) * N + n] * scale : 0.0f;
}

ALWAYS_INLINE void scatter_dn(float* m, int64_t d0, int nc, int64_t N, const vf in[][V]) {
  const float* s = reinterpret_cast<const float*>(in);
  for (int c = 0; c < nc; ++c)
    for (int64_t n = 0; n < N; ++n) m[(d0 + c) * N + n] = s[n * CB + c];
}

// Per-channel bounds on dt that keep every u = dt * A2[n] <= 127: dt >= 127 / A2[n]
// for negative A2, dt <= 127 / A2[n] for positive. Clamping dt once per step (for the
// exponent only) replaces a clamp per update; it only changes results where exp(dt A)
// would overflow to inf (it saturates near 2^127 instead).
struct DtRange {
  vf lo[V], hi[V];
  DtRange(const vf A2[][V], int64_t N) {
    alignas(kVecBytes) float l[CB], h[CB];
    const float* a = reinterpret_cast<const float*>(A2);  // a[n * CB + c]
    for (int c = 0; c < CB; ++c) {
      l[c] = -INFINITY, h[c] = INFINITY;
      for (int64_t n = 0; n < N; ++n) {
        const float an = a[n * CB + c];
        if (an < 0.0f) l[c] = std::max(l[c], 127.0f / an);
        if (an > 0.0f) h[c] = std::min(h[c], 127.0f / an);
      }
    }
    std::memcpy(lo, l, sizeof l);
    std::memcpy(hi, h, sizeof h);
  }
  ALWAYS_INLINE void clamp(const vf dt[V], vf out[V]) const {
    for (int v = 0; v < V; ++v) out[v] = vmin(hi[v], vmax(lo[v], dt[v]));
  }
};

ALWAYS_INLINE void load_param(const float* p, int64_t d0, int nc, vf out[V]) {
  if (p) {
    load_block(p + d0, nc, out);
  } else {
    zero_block(out);
  }
}

// y = (y + D x) * silu(z); also the tail of every forward step.
template <typename T>
ALWAYS_INLINE void skip_and_gate(vf y[V], const vf x[V], const vf Dv[V], const T* zrow, int nc) {
  for (int v = 0; v < V; ++v) y[v] += Dv[v] * x[v];
  if (!zrow) return;
  vf z[V];
  load_block(zrow, nc, z);
  for (int v = 0; v < V; ++v) y[v] *= z[v] * sigmoidv(z[v]);
}

// ---------------------------------------------------------------- threading

// A (B, L, X) tensor whose last dim is contiguous; rows may be strided (e.g. the
// x half of in_proj's output), so the caller need not copy.
template <typename T>
struct Rows {
  T* p = nullptr;
  int64_t sb = 0, st = 0;
  T* at(int64_t b, int64_t t) const { return p + b * sb + t * st; }
  explicit operator bool() const { return p != nullptr; }
};

template <typename T>
Rows<const T> rows(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1)};
}
template <typename T>
Rows<const T> rows(const std::optional<at::Tensor>& t) {
  return t && t->defined() ? rows<T>(*t) : Rows<const T>{};
}
template <typename T>
Rows<T> out_rows(at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1)};
}

const float* opt_ptr(const std::optional<at::Tensor>& t) {
  return t && t->defined() ? t->data_ptr<float>() : nullptr;
}

int plan_threads(int64_t tasks) {
  if (omp_in_parallel()) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks)));
}

// Runs body(task, tid) over [0, tasks) in contiguous static ranges, one per
// thread, on torch's OpenMP runtime (torch ships libgomp.so.1, which this
// library then shares); tid indexes per-thread scratch without locks.
template <typename F>
void run_tasks(int64_t tasks, int threads, const F& body) {
  if (threads <= 1) {
    for (int64_t i = 0; i < tasks; ++i) body(i, 0);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), got = omp_get_num_threads();
    const int64_t lo = tasks * tid / got, hi = tasks * (tid + 1) / got;
    for (int64_t i = lo; i < hi; ++i) body(i, tid);
  }
}

// ---------------------------------------------------------------- forward

template <typename T>
struct FwdArgs {
  Rows<const T> x, dt, z, Bm, Cm;
  Rows<T> y;
  const float *A, *Dskip, *h0;  // Dskip, h0 may be null
  float *h_last, *ckpt;         // ckpt: (B, nck, D, N) or null
  int64_t L, D, N, chunk, nck;
};

template <typename T>
void fwd_block(const FwdArgs<T>& p, int64_t b, int64_t d0) {
  const int nc = static_cast<int>(std::min<int64_t>(CB, p.D - d0));
  const int64_t N = p.N, DN = p.D * N;
  vf A2[kMaxN][V], h[kMaxN][V], Dv[V];
  gather_dn(p.A, d0, nc, N, kLog2e, A2);  // exp(dt A) = 2^(dt A log2e): fold log2e into A once
  gather_dn(p.h0 ? p.h0 + b * DN : nullptr, d0, nc, N, 1.0f, h);
  load_param(p.Dskip, d0, nc, Dv);
  const DtRange range(A2, N);
  float* ckpt = p.ckpt ? p.ckpt + b * p.nck * DN : nullptr;
  for (int64_t t = 0, until_ckpt = 0; t < p.L; ++t, --until_ckpt) {
    if (ckpt && until_ckpt == 0) {  // the state before chunk t / T (a counter: no division per step)
      scatter_dn(ckpt, d0, nc, N, h);
      ckpt += DN, until_ckpt = p.chunk;
    }
    vf dt[V], dte[V], x[V], dtx[V], y[V];
    load_block(p.dt.at(b, t) + d0, nc, dt);
    load_block(p.x.at(b, t) + d0, nc, x);
    range.clamp(dt, dte);
    for (int v = 0; v < V; ++v) dtx[v] = dt[v] * x[v], y[v] = vf{};
    const T *Bt = p.Bm.at(b, t), *Ct = p.Cm.at(b, t);
    for (int64_t n = 0; n < N; ++n) {
      const float bn = f32(Bt[n]), cn = f32(Ct[n]);
      for (int v = 0; v < V; ++v) {
        const vf hn = exp2_decay(dte[v] * A2[n][v]) * h[n][v] + dtx[v] * bn;
        h[n][v] = hn;
        y[v] += hn * cn;
      }
    }
    skip_and_gate(y, x, Dv, p.z ? p.z.at(b, t) + d0 : nullptr, nc);
    store_block(p.y.at(b, t) + d0, nc, y);
  }
  scatter_dn(p.h_last + b * DN, d0, nc, N, h);
}

int64_t num_blocks(int64_t D) { return (D + CB - 1) / CB; }

template <typename T>
void scan_fwd_impl(const FwdArgs<T>& p, int64_t batch) {
  const int64_t nb = num_blocks(p.D), tasks = batch * nb;
  run_tasks(tasks, plan_threads(tasks), [&](int64_t i, int) { fwd_block(p, i / nb, (i % nb) * CB); });
}

// ---------------------------------------------------------------- backward

template <typename T>
struct BwdArgs {
  Rows<const T> x, dt, z, Bm, Cm, dy;  // z, dy may be absent
  Rows<T> dx, ddt, dz;
  const float *A, *Dskip, *ckpt, *dh_last;  // Dskip, dh_last may be null
  float *dh0, *dA_part, *dD_part;           // (B, D, N), (B, D, N), (B, D)
  float *dB_acc, *dC_acc;                   // (threads, B, L, N): dB, dC sum over all channels
  int64_t Bsz, L, D, N, chunk, nck;
};

// Per-task scratch for one chunk of steps s..e-1: h holds [T+1][N][V] states
// (slot i is h_{s+i-1}, slot 0 the checkpoint), a the decays exp(dt_t A) [T][N][V].
struct ChunkBuf {
  std::vector<vf> h, a, ys, dt, x;  // ys, dt, x: [T][V]
  ChunkBuf(int64_t T, int64_t N) : h((T + 1) * N * V), a(T * N * V), ys(T * V), dt(T * V), x(T * V) {}
};

// Replays steps [s, e) from the checkpoint already in buf.h slot 0, filling buf.
// Each step reads its previous state from the buffer (no separate state array)
// and sums ys in registers: buf's vf pointers may alias, so sums kept there
// would make every += a store and a reload.
template <typename T>
void recompute_chunk(const BwdArgs<T>& p, int64_t b, int64_t d0, int nc, int64_t s, int64_t e,
                     const vf A2[][V], const DtRange& range, ChunkBuf& buf) {
  const int64_t N = p.N;
  for (int64_t t = s; t < e; ++t) {
    const int64_t i = t - s;
    vf *dt = &buf.dt[i * V], *x = &buf.x[i * V];
    const vf* hprev = &buf.h[i * N * V];
    vf *hb = &buf.h[(i + 1) * N * V], *ab = &buf.a[i * N * V];
    vf dtv[V], dte[V], xv[V], dtx[V], ys[V];
    load_block(p.dt.at(b, t) + d0, nc, dtv);
    load_block(p.x.at(b, t) + d0, nc, xv);
    range.clamp(dtv, dte);
    for (int v = 0; v < V; ++v) dtx[v] = dtv[v] * xv[v], ys[v] = vf{}, dt[v] = dtv[v], x[v] = xv[v];
    const T *Bt = p.Bm.at(b, t), *Ct = p.Cm.at(b, t);
    for (int64_t n = 0; n < N; ++n) {
      const float bn = f32(Bt[n]), cn = f32(Ct[n]);
      for (int v = 0; v < V; ++v) {
        const vf a = exp2_decay(dte[v] * A2[n][v]);
        const vf hn = a * hprev[n * V + v] + dtx[v] * bn;
        ab[n * V + v] = a;
        hb[n * V + v] = hn;
        ys[v] += hn * cn;
      }
    }
    std::copy(ys, ys + V, &buf.ys[i * V]);
  }
}

// Gradient through the skip and the gate of step t: returns g_pre = dL/d(h.C + D x),
// writes dz, accumulates dD.
template <typename T>
ALWAYS_INLINE void gate_grad(const BwdArgs<T>& p, int64_t b, int64_t t, int64_t d0, int nc, const vf ys[V],
                      const vf x[V], const vf Dv[V], vf gpre[V], vf dD[V]) {
  if (p.dy) {
    load_block(p.dy.at(b, t) + d0, nc, gpre);
  } else {
    zero_block(gpre);
  }
  if (p.z) {
    vf z[V], dz[V];
    load_block(p.z.at(b, t) + d0, nc, z);
    for (int v = 0; v < V; ++v) {
      const vf sg = sigmoidv(z[v]);
      const vf pre = ys[v] + Dv[v] * x[v];
      dz[v] = gpre[v] * pre * sg * (1.0f + z[v] * (1.0f - sg));  // silu'(z) = s (1 + z (1 - s))
      gpre[v] *= z[v] * sg;
    }
    store_block(p.dz.at(b, t) + d0, nc, dz);
  }
  for (int v = 0; v < V; ++v) dD[v] += gpre[v] * x[v];
}

// Adjoint recurrence over one chunk, t = e-1 .. s. r holds dL/dh_t flowing back from
// the future; per step r += g_pre C_t, then r <- a_t r. With q = a_t r h_{t-1}:
// ddt = sum_n q A + x sum_n r B, dA += q dt, dB_t = sum_d r dt x,
// dC_t = sum_d g_pre h_t, dx = g_pre D + dt sum_n r B. (q from h_{t-1}, not from
// h_t - dt x B, which cancels: dA would be rounding noise where it should be 0.)
template <typename T>
void reverse_chunk(const BwdArgs<T>& p, int64_t b, int64_t d0, int nc, int64_t s, int64_t e, int tid,
                   const vf Af[][V], const vf Dv[V], const ChunkBuf& buf, vf r[][V], vf dA[][V],
                   vf dD[V]) {
  const int64_t N = p.N;
  float* dBrow = p.dB_acc + (tid * p.Bsz + b) * p.L * N;
  float* dCrow = p.dC_acc + (tid * p.Bsz + b) * p.L * N;
  for (int64_t t = e - 1; t >= s; --t) {
    const int64_t i = t - s;
    const vf *hprev = &buf.h[i * N * V], *hb = &buf.h[(i + 1) * N * V], *ab = &buf.a[i * N * V];
    // Locals, not buf pointers: the stores to r and dA below could alias buf.
    vf dt[V], x[V], ys[V], gpre[V], dtx[V], s1[V], s2[V];
    std::copy(&buf.dt[i * V], &buf.dt[i * V] + V, dt);
    std::copy(&buf.x[i * V], &buf.x[i * V] + V, x);
    std::copy(&buf.ys[i * V], &buf.ys[i * V] + V, ys);
    gate_grad(p, b, t, d0, nc, ys, x, Dv, gpre, dD);
    for (int v = 0; v < V; ++v) dtx[v] = dt[v] * x[v], s1[v] = vf{}, s2[v] = vf{};
    const T *Bt = p.Bm.at(b, t), *Ct = p.Cm.at(b, t);
    vf gBs[kMaxN], gCs[kMaxN];  // per-lane partial dB_t, dC_t, reduced after the n loop
    for (int64_t n = 0; n < N; ++n) {
      const float bn = f32(Bt[n]), cn = f32(Ct[n]);
      vf gB = vf{}, gC = vf{};
      for (int v = 0; v < V; ++v) {
        const vf hn = hb[n * V + v];
        const vf rr = r[n][v] + gpre[v] * cn;
        const vf ar = ab[n * V + v] * rr;
        const vf q = ar * hprev[n * V + v];
        gC += gpre[v] * hn;
        gB += rr * dtx[v];
        s1[v] += rr * bn;
        s2[v] += q * Af[n][v];
        dA[n][v] += q * dt[v];
        r[n][v] = ar;
      }
      gBs[n] = gB;
      gCs[n] = gC;
    }
    add_row_sums(gBs, N, dBrow + t * N);
    add_row_sums(gCs, N, dCrow + t * N);
    vf dxv[V], ddt[V];
    for (int v = 0; v < V; ++v) {
      dxv[v] = gpre[v] * Dv[v] + dt[v] * s1[v];
      ddt[v] = s2[v] + x[v] * s1[v];
    }
    store_block(p.dx.at(b, t) + d0, nc, dxv);
    store_block(p.ddt.at(b, t) + d0, nc, ddt);
  }
}

template <typename T>
void bwd_block(const BwdArgs<T>& p, int64_t b, int64_t d0, int tid) {
  const int nc = static_cast<int>(std::min<int64_t>(CB, p.D - d0));
  const int64_t N = p.N, DN = p.D * N;
  vf A2[kMaxN][V], Af[kMaxN][V], r[kMaxN][V], dA[kMaxN][V], Dv[V], dD[V];
  gather_dn(p.A, d0, nc, N, kLog2e, A2);
  gather_dn(p.A, d0, nc, N, 1.0f, Af);
  gather_dn(p.dh_last ? p.dh_last + b * DN : nullptr, d0, nc, N, 1.0f, r);
  gather_dn(nullptr, d0, nc, N, 1.0f, dA);
  load_param(p.Dskip, d0, nc, Dv);
  zero_block(dD);
  const DtRange range(A2, N);
  ChunkBuf buf(p.chunk, N);
  for (int64_t c = p.nck - 1; c >= 0; --c) {
    const int64_t s = c * p.chunk, e = std::min(s + p.chunk, p.L);
    gather_dn(p.ckpt + (b * p.nck + c) * DN, d0, nc, N, 1.0f, reinterpret_cast<vf(*)[V]>(buf.h.data()));
    recompute_chunk(p, b, d0, nc, s, e, A2, range, buf);
    reverse_chunk(p, b, d0, nc, s, e, tid, Af, Dv, buf, r, dA, dD);
  }
  scatter_dn(p.dh0 + b * DN, d0, nc, N, r);
  scatter_dn(p.dA_part + b * DN, d0, nc, N, dA);
  store_block(p.dD_part + b * p.D + d0, nc, dD);
}

// ---------------------------------------------------------------- op entry points

template <typename F>
void dispatch_float_bf16(at::ScalarType st, const char* op, const F& f) {
  if (st == at::kFloat) {
    f(float{});
  } else if (st == at::kBFloat16) {
    f(c10::BFloat16{});
  } else {
    TORCH_CHECK(false, op, ": expected float32 or bfloat16 activations, got ", st);
  }
}

void check_rows(const at::Tensor& t, const char* name, at::ScalarType st) {
  TORCH_CHECK(t.dim() == 3 && t.stride(2) == 1, name, ": expected a 3-D tensor with a contiguous last dim");
  TORCH_CHECK(t.scalar_type() == st, name, ": dtype ", t.scalar_type(), " differs from x's ", st);
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), name, ": expected contiguous float32");
}

// The Python wrapper (fused.py) already raised InputError for bad shapes; these
// guards keep a direct torch.ops call from reading out of bounds.
void check_sizes(const at::Tensor& t, const char* name, c10::IntArrayRef sizes) {
  TORCH_CHECK(t.sizes() == sizes, name, ": expected sizes ", sizes, ", got ", t.sizes());
}

void check_common(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const std::optional<at::Tensor>& D,
                  const std::optional<at::Tensor>& z, int64_t chunk) {
  const auto st = x.scalar_type();
  const std::pair<const at::Tensor*, const char*> seqs[] = {{&x, "x"}, {&dt, "dt"}, {&B, "B"}, {&C, "C"}};
  for (auto [t, name] : seqs) check_rows(*t, name, st);
  if (z) check_rows(*z, "z", st);
  check_f32(A, "A");
  if (D) check_f32(*D, "D");
  TORCH_CHECK(A.dim() == 2 && A.size(1) <= kMaxN, "A: expected (D, N) with N <= ", kMaxN);
  const int64_t Bsz = x.size(0), L = x.size(1), Dn = x.size(2), N = A.size(1);
  check_sizes(dt, "dt", x.sizes());
  if (z) check_sizes(*z, "z", x.sizes());
  check_sizes(A, "A", {Dn, N});
  check_sizes(B, "B", {Bsz, L, N});
  check_sizes(C, "C", {Bsz, L, N});
  if (D) check_sizes(*D, "D", {Dn});
  TORCH_CHECK(chunk >= 1, "chunk_size must be >= 1");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_fwd(
    const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& h0, int64_t chunk, bool save_ckpt) {
  check_common(x, dt, A, B, C, D, z, chunk);
  const int64_t Bsz = x.size(0), L = x.size(1), Dn = x.size(2), N = A.size(1);
  if (h0) check_f32(*h0, "h0"), check_sizes(*h0, "h0", {Bsz, Dn, N});
  const int64_t nck = (L + chunk - 1) / chunk;
  auto y = at::empty({Bsz, L, Dn}, x.options());
  auto h_last = at::empty({Bsz, Dn, N}, A.options());
  auto ckpt = at::empty({save_ckpt ? Bsz : 0, nck, Dn, N}, A.options());
  dispatch_float_bf16(x.scalar_type(), "scan_fwd", [&](auto tag) {
    using T = decltype(tag);
    FwdArgs<T> p{rows<T>(x), rows<T>(dt), rows<T>(z), rows<T>(B), rows<T>(C), out_rows<T>(y),
                 A.data_ptr<float>(), opt_ptr(D), opt_ptr(h0), h_last.data_ptr<float>(),
                 save_ckpt ? ckpt.data_ptr<float>() : nullptr, L, Dn, N, chunk, nck};
    scan_fwd_impl(p, Bsz);
  });
  return {y, h_last, ckpt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
scan_bwd(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
         const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
         const at::Tensor& ckpt, const std::optional<at::Tensor>& dy,
         const std::optional<at::Tensor>& dh_last, int64_t chunk) {
  check_common(x, dt, A, B, C, D, z, chunk);
  const int64_t Bsz = x.size(0), L = x.size(1), Dn = x.size(2), N = A.size(1);
  const int64_t nck = (L + chunk - 1) / chunk;
  check_f32(ckpt, "ckpt");
  TORCH_CHECK(ckpt.numel() == Bsz * nck * Dn * N, "ckpt: wrong size for chunk_size ", chunk);
  if (dy) check_rows(*dy, "dy", x.scalar_type()), check_sizes(*dy, "dy", x.sizes());
  if (dh_last) check_f32(*dh_last, "dh_last"), check_sizes(*dh_last, "dh_last", {Bsz, Dn, N});
  const int64_t nb = num_blocks(Dn), tasks = Bsz * nb;
  const int threads = plan_threads(tasks);
  auto dx = at::empty({Bsz, L, Dn}, x.options());
  auto ddt = at::empty({Bsz, L, Dn}, x.options());
  auto dz = at::empty({z ? Bsz : 0, L, Dn}, x.options());
  auto f32 = A.options();
  auto dh0 = at::empty({Bsz, Dn, N}, f32);
  auto dA_part = at::empty({Bsz, Dn, N}, f32);
  auto dD_part = at::empty({Bsz, Dn}, f32);
  auto dB_acc = at::zeros({threads, Bsz, L, N}, f32);
  auto dC_acc = at::zeros({threads, Bsz, L, N}, f32);
  dispatch_float_bf16(x.scalar_type(), "scan_bwd", [&](auto tag) {
    using T = decltype(tag);
    BwdArgs<T> p{rows<T>(x), rows<T>(dt), rows<T>(z), rows<T>(B), rows<T>(C), rows<T>(dy),
                 out_rows<T>(dx), out_rows<T>(ddt), z ? out_rows<T>(dz) : Rows<T>{},
                 A.data_ptr<float>(), opt_ptr(D), ckpt.data_ptr<float>(), opt_ptr(dh_last),
                 dh0.data_ptr<float>(), dA_part.data_ptr<float>(), dD_part.data_ptr<float>(),
                 dB_acc.data_ptr<float>(), dC_acc.data_ptr<float>(), Bsz, L, Dn, N, chunk, nck};
    run_tasks(tasks, threads, [&](int64_t i, int tid) { bwd_block(p, i / nb, (i % nb) * CB, tid); });
  });
  return {dx, ddt, dA_part.sum(0), dB_acc.sum(0), dC_acc.sum(0), dD_part.sum(0), dz, dh0};
}

// ---------------------------------------------------------------- decode steps

// Splits [0, n) over threads only when there is enough work to pay for the fork.
int row_parts(int64_t n, int64_t work_per_row) { return n * work_per_row >= (1 << 16) ? plan_threads(n) : 1; }

template <typename F>
void run_rows(int64_t n, int64_t work_per_row, const F& body) {
  const int threads = row_parts(n, work_per_row);
  run_tasks(threads, threads, [&](int64_t i, int) { body(n * i / threads, n * (i + 1) / threads); });
}

// Decode-step epilogues, vectorised over channels: a scalar std::exp per channel
// cost more than the conv itself. out[i] = v[i] * silu(g[i]); silu(v[i]) when g is null.
template <typename G>
ALWAYS_INLINE vf load_w(const G* p) {
  alignas(kVecBytes) float tmp[W];
  for (int i = 0; i < W; ++i) tmp[i] = f32(p[i]);
  vf out;
  std::memcpy(&out, tmp, sizeof out);
  return out;
}

template <typename T, typename G>
void silu_gate(const float* v, const G* g, T* out, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    vf vv, gv;
    std::memcpy(&vv, v + i, sizeof vv);
    gv = g ? load_w(g + i) : vv;
    const vf r = (g ? vv : splat(1.0f)) * gv * sigmoidv(gv);
    alignas(kVecBytes) float tmp[W];
    std::memcpy(tmp, &r, sizeof r);
    for (int k = 0; k < W; ++k) out[i + k] = from_f32<T>(tmp[k]);
  }
  for (; i < n; ++i) {
    const float gi = g ? f32(g[i]) : v[i];
    out[i] = from_f32<T>((g ? v[i] : 1.0f) * gi / (1.0f + std::exp(-gi)));
  }
}

// One token for rows [lo, hi) of the flattened (B, D): the state (B, D, N) has N
// contiguous per channel, so this vectorises over N (W at a time, a scalar tail)
// and sums h . C horizontally once per channel.
template <typename T>
void state_update_rows(int64_t lo, int64_t hi, float* h, const T* x, const T* dt, const float* A,
                       const T* Bm, const T* Cm, const float* Dskip, const T* z, T* y, int64_t D,
                       int64_t N) {
  std::vector<float> bf(N), cf(N), pre(hi - lo);  // pre: y before the gate
  // (b, d) walked along with row: a 64-bit division per row cost as much as the row.
  for (int64_t row = lo, b = lo / D, d = lo % D; row < hi; ++row, d = d + 1 == D ? (++b, 0) : d + 1) {
    if (row == lo || d == 0) {  // B_b, C_b in fp32 once per batch row
      for (int64_t n = 0; n < N; ++n) bf[n] = f32(Bm[b * N + n]), cf[n] = f32(Cm[b * N + n]);
    }
    const float dtv = f32(dt[row]), xv = f32(x[row]), dtx = dtv * xv, ul = dtv * kLog2e;
    float* hd = h + row * N;
    const float* Ad = A + d * N;
    vf acc{};
    int64_t n = 0;
    for (; n + W <= N; n += W) {
      vf hv, av, bv, cv;
      std::memcpy(&hv, hd + n, sizeof hv);
      std::memcpy(&av, Ad + n, sizeof av);
      std::memcpy(&bv, bf.data() + n, sizeof bv);
      std::memcpy(&cv, cf.data() + n, sizeof cv);
      hv = exp2v(av * ul) * hv + dtx * bv;
      std::memcpy(hd + n, &hv, sizeof hv);
      acc += hv * cv;
    }
    float out = hsum(acc);
    for (; n < N; ++n) {
      hd[n] = exp2s(Ad[n] * ul) * hd[n] + dtx * bf[n];
      out += hd[n] * cf[n];
    }
    pre[row - lo] = Dskip ? out + Dskip[d] * xv : out;
  }
  if (z) {
    silu_gate(pre.data(), z + lo, y + lo, hi - lo);
  } else {
    for (int64_t row = lo; row < hi; ++row) y[row] = from_f32<T>(pre[row - lo]);
  }
}

}  // namespace

namespace jambalab {

at::Tensor state_update(at::Tensor& h, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                        const std::optional<at::Tensor>& z) {
  check_f32(h, "h");
  check_f32(A, "A");
  if (D) check_f32(*D, "D");
  const auto st = x.scalar_type();
  const std::pair<const at::Tensor*, const char*> ins[] = {{&x, "x"}, {&dt, "dt"}, {&B, "B"}, {&C, "C"}};
  for (auto [t, name] : ins)
    TORCH_CHECK(t->scalar_type() == st && t->is_contiguous(), name, ": expected contiguous ", st);
  if (z) TORCH_CHECK(z->scalar_type() == st && z->is_contiguous(), "z: expected contiguous ", st);
  TORCH_CHECK(h.dim() == 3, "h: expected (B, D, N)");
  const int64_t Bsz = h.size(0), Dn = h.size(1), N = h.size(2);
  check_sizes(x, "x", {Bsz, Dn});
  check_sizes(dt, "dt", {Bsz, Dn});
  check_sizes(B, "B", {Bsz, N});
  check_sizes(C, "C", {Bsz, N});
  if (z) check_sizes(*z, "z", {Bsz, Dn});
  check_sizes(A, "A", {Dn, N});
  if (D) check_sizes(*D, "D", {Dn});
  auto y = at::empty({Bsz, Dn}, x.options());
  dispatch_float_bf16(st, "state_update", [&](auto tag) {
    using T = decltype(tag);
    const T* zp = z ? z->data_ptr<T>() : nullptr;
    run_rows(Bsz * Dn, N, [&](int64_t lo, int64_t hi) {
      state_update_rows<T>(lo, hi, h.data_ptr<float>(), x.data_ptr<T>(), dt.data_ptr<T>(),
                           A.data_ptr<float>(), B.data_ptr<T>(), C.data_ptr<T>(), opt_ptr(D), zp,
                           y.data_ptr<T>(), Dn, N);
    });
  });
  return y;
}

int update_parts(int64_t rows, int64_t work_per_row) { return row_parts(rows, work_per_row); }

void state_update_part(int part, int parts, float* h, const float* x, const float* dt, const float* A,
                       const float* B, const float* C, const float* D, const float* z, float* y, int64_t R,
                       int64_t Dn, int64_t N) {
  const int64_t n = R * Dn;
  state_update_rows<float>(n * part / parts, n * (part + 1) / parts, h, x, dt, A, B, C, D, z, y, Dn, N);
}

void state_update_part_bf16(int part, int parts, float* h, const uint16_t* x, const uint16_t* dt, const float* A,
                            const uint16_t* B, const uint16_t* C, const float* D, const uint16_t* z, uint16_t* y,
                            int64_t R, int64_t Dn, int64_t N) {
  using BF = c10::BFloat16;
  const auto bf = [](const uint16_t* p) { return reinterpret_cast<const BF*>(p); };
  const int64_t n = R * Dn;
  state_update_rows<BF>(n * part / parts, n * (part + 1) / parts, h, bf(x), bf(dt), A, bf(B), bf(C), D, bf(z),
                        reinterpret_cast<BF*>(y), Dn, N);
}

}  // namespace jambalab

namespace {

template <typename X, typename S>
void conv_update_rows(int64_t lo, int64_t hi, const X* x, S* state, const float* w, const float* bias,
                      X* out, int64_t D, int64_t K) {
  std::vector<float> pre(hi - lo);  // the conv before silu
  for (int64_t row = lo, d = lo % D; row < hi; ++row, d = d + 1 == D ? 0 : d + 1) {
    S* s = state + row * K;
    const float* wd = w + d * K;
    float acc = 0.0f;
    for (int64_t k = 0; k + 1 < K; ++k) {  // shift and dot in one pass: no reload of just-stored values
      const S v = s[k + 1];
      s[k] = v;
      acc += f32(v) * wd[k];
    }
    const S xs = static_cast<S>(f32(x[row]));
    s[K - 1] = xs;
    acc += f32(xs) * wd[K - 1];
    pre[row - lo] = bias ? acc + bias[d] : acc;
  }
  silu_gate(pre.data(), static_cast<const float*>(nullptr), out + lo, hi - lo);
}

}  // namespace

namespace jambalab {

at::Tensor conv_update(const at::Tensor& x, at::Tensor& conv_state, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias) {
  check_f32(weight, "weight");
  if (bias) check_f32(*bias, "bias");
  TORCH_CHECK(x.is_contiguous() && conv_state.is_contiguous(), "conv_update: expected contiguous x, conv_state");
  TORCH_CHECK(conv_state.dim() == 3, "conv_state: expected (B, D, K)");
  const int64_t Bsz = conv_state.size(0), Dn = conv_state.size(1), K = conv_state.size(2);
  check_sizes(x, "x", {Bsz, Dn});
  check_sizes(weight, "weight", {Dn, K});
  if (bias) check_sizes(*bias, "bias", {Dn});
  auto out = at::empty({Bsz, Dn}, x.options());
  dispatch_float_bf16(x.scalar_type(), "conv_update", [&](auto xtag) {
    dispatch_float_bf16(conv_state.scalar_type(), "conv_update", [&](auto stag) {
      using X = decltype(xtag);
      using S = decltype(stag);
      run_rows(Bsz * Dn, K, [&](int64_t lo, int64_t hi) {
        conv_update_rows<X, S>(lo, hi, x.data_ptr<X>(), conv_state.data_ptr<S>(),
                               weight.data_ptr<float>(), opt_ptr(bias), out.data_ptr<X>(), Dn, K);
      });
    });
  });
  return out;
}

void conv_update_part(int part, int parts, const float* x, float* conv_state, const float* w, const float* bias,
                      float* out, int64_t R, int64_t Dn, int64_t K) {
  const int64_t n = R * Dn;
  conv_update_rows<float, float>(n * part / parts, n * (part + 1) / parts, x, conv_state, w, bias, out, Dn, K);
}

void conv_update_part_bf16(int part, int parts, const uint16_t* x, uint16_t* conv_state, const float* w,
                           const float* bias, uint16_t* out, int64_t R, int64_t Dn, int64_t K) {
  using BF = c10::BFloat16;
  const int64_t n = R * Dn;
  conv_update_rows<BF, BF>(n * part / parts, n * (part + 1) / parts, reinterpret_cast<const BF*>(x),
                           reinterpret_cast<BF*>(conv_state), w, bias, reinterpret_cast<BF*>(out), Dn, K);
}

}  // namespace jambalab


// Schemas, then CPU kernels (not catch-all ones: jambalab/ops/cpu.py registers
// shape-only fake kernels so that torch.compile can trace through these ops).
TORCH_LIBRARY(jambalab_kernels, m) {
  m.def(
      "scan_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? h0, "
      "int chunk, bool save_ckpt) -> (Tensor, Tensor, Tensor)");
  m.def(
      "scan_bwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor ckpt, "
      "Tensor? dy, Tensor? dh_last, int chunk) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "state_update(Tensor(a!) h, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z) -> Tensor");
  m.def("conv_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(jambalab_kernels, CPU, m) {
  m.impl("scan_fwd", &scan_fwd);
  m.impl("scan_bwd", &scan_bwd);
  m.impl("state_update", &jambalab::state_update);
  m.impl("conv_update", &jambalab::conv_update);
}
