// Decode attention: one query per head over every cached key (all visible), float32, CPU
// (twin: jambalab.ops.decode_attention_ref, SDPA with enable_gqa).
//
// Legend: B batch, H query heads, Hk key/value heads, G = H / Hk (the GQA group), S cached
// keys, hd head_dim, P key splits.
//
// Why: after a long prompt a decode token reads the whole KV cache, so its attention should run
// at the memory bandwidth. torch's CPU flash kernel is built for many query rows; with the G
// queries of one KV head it ran a bench-hybrid token at 23 ms with 256K cached tokens, of which
// the K/V reads are ~4 ms. Here each (b, kv head, split of the keys) is one task that reads its
// K and V rows once, scores them against the G queries of the group, and keeps an online softmax
// (running max, sum, unnormalised output); the splits merge by their maxima and sums, as
// flash-decoding does, so both cores work even on one sequence with one KV head.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"
#include "simd.h"  // W, vf, load, hsum, exp2_fast

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int64_t kSplitKeys = 2048;  // keys per task: ~0.5 MiB of K and V at hd 64, enough to amortise the fork
constexpr int kBlock = 64;            // keys scored at once before the softmax update
constexpr int kMaxGroup = 64;

// q . k for one key row (hd floats), by W-wide vectors.
inline float dot(const float* q, const float* k, int64_t hd) {
  vf a0{}, a1{};
  int64_t i = 0;
  for (; i + 2 * W <= hd; i += 2 * W) {
    a0 += load(q + i) * load(k + i);
    a1 += load(q + i + W) * load(k + i + W);
  }
  for (; i + W <= hd; i += W) a0 += load(q + i) * load(k + i);
  float s = hsum(a0 + a1);
  for (; i < hd; ++i) s += q[i] * k[i];
  return s;
}

// One task: the G queries qg (G, hd, already scaled by log2(e) / sqrt(hd)) against keys [lo, hi)
// of one (b, kv head). Writes, per query, the running max m (log2 units), the sum l of
// 2^(s - m) and the unnormalised output acc (hd,).
void attend_split(const float* qg, int G, const float* k, const float* v, int64_t ss, int64_t lo, int64_t hi,
                  int64_t hd, float* m, float* l, float* acc) {
  float s[kMaxGroup][kBlock];
  for (int g = 0; g < G; ++g) {
    m[g] = -std::numeric_limits<float>::infinity();
    l[g] = 0.0f;
    std::fill(acc + g * hd, acc + (g + 1) * hd, 0.0f);
  }
  for (int64_t j0 = lo; j0 < hi; j0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, hi - j0));
    for (int j = 0; j < n; ++j) {
      const float* kr = k + (j0 + j) * ss;
      for (int g = 0; g < G; ++g) s[g][j] = dot(qg + g * hd, kr, hd);
    }
    for (int g = 0; g < G; ++g) {
      float mx = m[g];
      for (int j = 0; j < n; ++j) mx = std::max(mx, s[g][j]);
      const float corr = exp2_fast(m[g] - mx);  // ~0 on the first block (m = -inf, clamped in exp2_fast)
      float* sg = s[g];
      for (int j = 0; j < n; ++j) sg[j] = exp2_fast(sg[j] - mx);  // a loop of its own: GCC vectorises it
      float sum = 0.0f;
      for (int j = 0; j < n; ++j) sum += sg[j];
      m[g] = mx;
      l[g] = l[g] * corr + sum;
      float* a = acc + g * hd;
      for (int64_t i = 0; i < hd; ++i) a[i] *= corr;
    }
    // acc_g += sum_j p_gj v_j, 4W columns at a time so that the accumulators stay in registers over
    // the block's keys (the block's V rows come from L1 after the first query of the group).
    for (int g = 0; g < G; ++g) {
      float* a = acc + g * hd;
      const float* pg = s[g];
      int64_t i = 0;
      for (; i + 4 * W <= hd; i += 4 * W) {  // four independent accumulators hide the FMA latency
        vf a0 = load(a + i), a1 = load(a + i + W), a2 = load(a + i + 2 * W), a3 = load(a + i + 3 * W);
        for (int j = 0; j < n; ++j) {
          const float* vr = v + (j0 + j) * ss + i;
          const float pj = pg[j];
          a0 += pj * load(vr);
          a1 += pj * load(vr + W);
          a2 += pj * load(vr + 2 * W);
          a3 += pj * load(vr + 3 * W);
        }
        std::memcpy(a + i, &a0, sizeof a0);
        std::memcpy(a + i + W, &a1, sizeof a1);
        std::memcpy(a + i + 2 * W, &a2, sizeof a2);
        std::memcpy(a + i + 3 * W, &a3, sizeof a3);
      }
      for (; i + W <= hd; i += W) {
        vf ai = load(a + i);
        for (int j = 0; j < n; ++j) ai += pg[j] * load(v + (j0 + j) * ss + i);
        std::memcpy(a + i, &ai, sizeof ai);
      }
      for (; i < hd; ++i) {
        float ai = a[i];
        for (int j = 0; j < n; ++j) ai += pg[j] * v[(j0 + j) * ss + i];
        a[i] = ai;
      }
    }
  }
}

void check(const at::Tensor& t, const char* name, int64_t B, int64_t hd) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 4 && t.size(0) == B && t.size(3) == hd &&
                  t.stride(3) == 1 && t.stride(2) == hd,
              "decode_attention: ", name, " must be float32 (", B, ", Hk, S, ", hd,
              ") with contiguous rows (a view of a KV cache is fine), got ", t.sizes(), " strides ", t.strides(), " ",
              t.scalar_type());
}

}  // namespace

namespace jambalab {

int64_t DecodeAttention::tasks() const { return B * Hk * splits(); }

int64_t DecodeAttention::splits() const { return (S + kSplitKeys - 1) / kSplitKeys; }

void DecodeAttention::prepare(const float* q) {
  // Queries scaled once: scores come out in log2 units for exp2_fast.
  const float scale = kLog2e / std::sqrt(static_cast<float>(hd));
  const int64_t G = H / Hk, n = tasks();
  qs.resize(B * H * hd);
  for (int64_t i = 0; i < B * H * hd; ++i) qs[i] = q[i] * scale;
  m.resize(n * G);
  l.resize(n * G);
  acc.resize(n * G * hd);
}

void DecodeAttention::run(int64_t t) {
  const int64_t P = splits(), G = H / Hk, b = t / (Hk * P), kh = (t / P) % Hk, p = t % P;
  attend_split(qs.data() + (b * H + kh * G) * hd, static_cast<int>(G), k.p + b * k.sb + kh * k.sh,
               v.p + b * v.sb + kh * v.sh, k.ss, p * kSplitKeys, std::min(S, (p + 1) * kSplitKeys), hd,
               m.data() + t * G, l.data() + t * G, acc.data() + t * G * hd);
}

// Merge the P splits of each (b, kv head, query).
void DecodeAttention::merge(float* o) const {
  const int64_t P = splits(), G = H / Hk;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t kh = 0; kh < Hk; ++kh) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t t0 = (b * Hk + kh) * P;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p < P; ++p) top = std::max(top, m[(t0 + p) * G + g]);
        float* y = o + (b * H + kh * G + g) * hd;
        std::fill(y, y + hd, 0.0f);
        float total = 0.0f;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t t = t0 + p;
          const float w = exp2_fast(m[t * G + g] - top);
          total += w * l[t * G + g];
          const float* a = acc.data() + (t * G + g) * hd;
          for (int64_t i = 0; i < hd; ++i) y[i] += w * a[i];
        }
        for (int64_t i = 0; i < hd; ++i) y[i] /= total;
      }
    }
  }
}

}  // namespace jambalab

// q (B, H, hd) -> (B, H, hd): softmax(q k^T / sqrt(hd)) v over all S keys, query head h using kv head h / G.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 3 && q.is_contiguous(),
              "decode_attention: q must be contiguous float32 (B, H, hd), got ", q.sizes(), " ", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(2);
  check(k, "k", B, hd);
  check(v, "v", B, hd);
  const int64_t Hk = k.size(1), S = k.size(2);
  TORCH_CHECK(v.size(1) == Hk && v.size(2) == S, "decode_attention: k ", k.sizes(), " and v ", v.sizes(), " differ");
  TORCH_CHECK(Hk >= 1 && H % Hk == 0 && H / Hk <= kMaxGroup, "decode_attention: ", H, " query heads over ", Hk,
              " kv heads (groups of at most ", kMaxGroup, ")");
  TORCH_CHECK(S >= 1, "decode_attention: no keys");
  jambalab::DecodeAttention att;
  att.B = B, att.H = H, att.Hk = Hk, att.S = S, att.hd = hd;
  att.k = {k.data_ptr<float>(), k.stride(0), k.stride(1), k.stride(2)};
  att.v = {v.data_ptr<float>(), v.stride(0), v.stride(1), v.stride(2)};
  att.prepare(q.data_ptr<float>());
  at::parallel_for(0, att.tasks(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) att.run(t);
  });
  auto out = at::empty({B, H, hd}, q.options());
  att.merge(out.data_ptr<float>());
  return out;
}

TORCH_LIBRARY_FRAGMENT(jambalab_kernels, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v) -> Tensor");
}

TORCH_LIBRARY_IMPL(jambalab_kernels, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
