// A bf16 model's whole decode step in one call (step.cpp's decode_step hands it a model whose embedding
// is bf16): bf16 weights, activations and conv states, the SSM state float32, 1 to 16 rows, on any CPU. Its
// twin is the layer-by-layer path of jambalab/model.py for the same bf16 model, and the logits are bitwise
// those (tests/test_decode_step.py): every value is rounded to bf16 where that path rounds it, and each
// piece runs what that path runs on the same rows:
// - GEMVs: wgemv's bf16 x bf16 kernel (Bf16Dot, the fp32 sums then rounded to bf16; a bias in
//   fp32 before the rounding), on the same rows (R <= 16; an MoE expert on the rows routed to it);
// - norms: the rms_norm op's rows (rms_norm_rows_bf16; float32 x with a bf16 weight for a float32
//   residual's final norm);
// - conv and SSM updates: the ops' parts over bf16 activations, on the same split;
// - softplus(dt + bias), silu, the router's softmax and top-k, and attention (torch's CPU flash kernel,
//   on each row's own keys as the layer path's ragged rows) call ATen on the shapes that path uses.
// The residual stream is bf16 (h + x rounded, as HF Jamba), or float32 (residual_in_fp32, Falcon Mamba:
// a layer's input is h rounded to bf16, its output added in fp32); a float32 residual is taken only
// without FFN layers.
//
// Legend: R rows, d d_model, D d_inner, N d_state, Rk dt_rank, Kc d_conv, H heads, Hk KV heads,
// hd head_dim, E experts, F d_ff, V vocab.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <vector>

#include "kernels.h"    // Bf16Dot, rms_norm_rows_bf16, the bf16 update parts
#include "step_common.h"  // split_outputs, run_parts, Routing, SerialAten, check_kv_rows

namespace {

using u16 = uint16_t;

u16 bits(float v) { return c10::BFloat16(v).x; }  // round to nearest even, as ATen's casts
float val(u16 b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }

const u16* bf(const at::Tensor& t) { return reinterpret_cast<const u16*>(t.data_ptr<c10::BFloat16>()); }
u16* bf_mut(const at::Tensor& t) { return reinterpret_cast<u16*>(t.data_ptr<c10::BFloat16>()); }

// A bf16 tensor over a buffer of the step (no copy).
at::Tensor view(u16* p, at::IntArrayRef sizes) {
  return at::from_blob(p, sizes, at::TensorOptions().dtype(at::kBFloat16));
}

// A bf16 vector (or none) as float32, as the layer path's _f32 (exact).
std::vector<float> widen(const at::Tensor& t) {
  std::vector<float> out(t.numel());
  const u16* p = t.numel() ? bf(t) : nullptr;
  for (size_t i = 0; i < out.size(); ++i) out[i] = val(p[i]);
  return out;
}

struct Bf16Step {
  int64_t R = 0;
  int threads = 1;

  // y (R, N) = x (R, K) @ w (N, K)^T (+ bias in fp32), rounded to bf16: wgemv on a bf16 model.
  void gemv(const u16* x, const at::Tensor& w, const float* bias, u16* y) const {
    const int64_t N = w.size(0), K = w.size(1);
    std::vector<float> acc(R * N);
    const u16* wp = bf(w);
    const jambalab::Bf16Dot rows(x, R, K);
    jambalab::split_outputs(N, N * K * 2, K * 2, threads, [&](int64_t lo, int64_t hi) {
      rows.outputs(wp, bias, acc.data(), N, lo, hi);
    });
    for (int64_t i = 0; i < R * N; ++i) y[i] = bits(acc[i]);
  }

  // silu(g) * u in place in g (rows, F): model.swiglu's silu_ and mul_ in bf16.
  static void swiglu(u16* g, u16* u, int64_t rows, int64_t F) {
    at::Tensor gt = view(g, {rows, F});
    at::silu_(gt);
    gt.mul_(view(u, {rows, F}));
  }

  // down(silu(gate(x)) * up(x)) for `rows` rows of x (R, d): MLP.forward, and one MoE expert.
  void mlp(const u16* x, int64_t rows, const at::Tensor& wg, const at::Tensor& wu, const at::Tensor& wd, u16* y) const {
    const int64_t F = wg.size(0);
    std::vector<u16> g(rows * F), u(rows * F);
    Bf16Step some = *this;
    some.R = rows;
    some.gemv(x, wg, nullptr, g.data());
    some.gemv(x, wu, nullptr, u.data());
    swiglu(g.data(), u.data(), rows, F);
    some.gemv(g.data(), wd, nullptr, y);
  }

  // MoE.forward in bf16: bf16 router logits, softmax in fp32, top-k (k <= 2) weights rounded to bf16;
  // each expert once on the rows routed to it (MoE.dispatch; _one_token for one row), its output times
  // the row's weight rounded to bf16, a row's experts summed in ascending id order in bf16.
  void moe(const u16* x, const at::Tensor* w, int64_t top_k, int64_t d, u16* y) const {
    const at::Tensor &router = w[0], &wg = w[1], &wu = w[2], &wd = w[3];
    const int64_t E = router.size(0);
    std::vector<u16> logits(R * E);
    gemv(x, router, nullptr, logits.data());
    const auto [probs, experts] = at::topk(at::softmax(view(logits.data(), {R, E}), -1, at::kFloat), top_k, -1);
    const at::Tensor weights = probs.to(at::kBFloat16);  // (R, k)
    const u16* wts = bf(weights);
    const jambalab::Routing routing(experts, E);
    std::vector<u16> ye(R * top_k * d);  // row r's k-th choice at (r * top_k + k) * d, weighted
    std::vector<u16> xe, out;
    for (int64_t e = 0; e < E; ++e) {
      const std::vector<int64_t>& slots = routing.slots[e];
      if (slots.empty()) continue;
      const int64_t n = static_cast<int64_t>(slots.size());
      xe.resize(n * d), out.resize(n * d);
      for (int64_t i = 0; i < n; ++i) std::memcpy(xe.data() + i * d, x + slots[i] / top_k * d, d * 2);
      mlp(xe.data(), n, wg.select(0, e), wu.select(0, e), wd.select(0, e), out.data());
      for (int64_t i = 0; i < n; ++i) {
        const float wt = val(wts[slots[i]]);
        u16* dst = ye.data() + slots[i] * d;
        for (int64_t j = 0; j < d; ++j) dst[j] = bits(val(out[i * d + j]) * wt);
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      const std::vector<int64_t>& order = routing.order[r];
      u16* yr = y + r * d;
      std::memcpy(yr, ye.data() + (r * top_k + order[0]) * d, d * 2);
      for (int64_t j = 1; j < top_k; ++j) {
        const u16* add = ye.data() + (r * top_k + order[j]) * d;
        for (int64_t i = 0; i < d; ++i) yr[i] = bits(val(yr[i]) + val(add[i]));
      }
    }
  }

  // MambaMixer._step in bf16: x (R, d) -> y (R, d); conv (R, D, Kc) bf16 and ssm (R, D, N) fp32 in place.
  void mamba(const u16* x, const at::Tensor* w, bool inner_norm, float inner_eps, at::Tensor& conv, at::Tensor& ssm,
             u16* y) const {
    const at::Tensor &in_w = w[0], &x_proj = w[4], &dt_proj = w[8], &A = w[10], &out_w = w[12];
    const int64_t Dn = ssm.size(1), N = ssm.size(2), Kc = conv.size(2), Rk = dt_proj.size(1), Wd = Rk + 2 * N;
    const std::vector<float> in_b = widen(w[1]), conv_w = widen(w[2]), conv_b = widen(w[3]), Dsk = widen(w[11]),
                             out_b = widen(w[13]);
    const auto opt = [](const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); };
    std::vector<u16> xz(R * 2 * Dn), xs(R * Dn), z(R * Dn), xc(R * Dn), dbc(R * Wd), dt(R * Rk), B(R * N), C(R * N),
        dtf(R * Dn), yy(R * Dn);
    gemv(x, in_w, opt(in_b), xz.data());
    for (int64_t r = 0; r < R; ++r) {
      std::memcpy(xs.data() + r * Dn, xz.data() + r * 2 * Dn, Dn * 2);
      std::memcpy(z.data() + r * Dn, xz.data() + r * 2 * Dn + Dn, Dn * 2);
    }
    u16* cs = bf_mut(conv);
    jambalab::run_parts(Kc, R * Dn, threads, [&](int p, int np) {
      jambalab::conv_update_part_bf16(p, np, xs.data(), cs, conv_w.data(), opt(conv_b), xc.data(), R, Dn, Kc);
    });
    gemv(xc.data(), x_proj, nullptr, dbc.data());
    for (int64_t r = 0; r < R; ++r) {
      std::memcpy(dt.data() + r * Rk, dbc.data() + r * Wd, Rk * 2);
      std::memcpy(B.data() + r * N, dbc.data() + r * Wd + Rk, N * 2);
      std::memcpy(C.data() + r * N, dbc.data() + r * Wd + Rk + N, N * 2);
    }
    if (inner_norm) {
      const auto weight = [](const at::Tensor& t) { return t.numel() ? bf(t) : nullptr; };
      jambalab::rms_norm_rows_bf16(dt.data(), weight(w[5]), dt.data(), R, Rk, inner_eps);
      jambalab::rms_norm_rows_bf16(B.data(), weight(w[6]), B.data(), R, N, inner_eps);
      jambalab::rms_norm_rows_bf16(C.data(), weight(w[7]), C.data(), R, N, inner_eps);
    }
    gemv(dt.data(), dt_proj, nullptr, dtf.data());
    // dt_softplus_ref: softplus(dt + bias) in bf16, through ATen as the layer path.
    const at::Tensor dts = at::softplus(at::add(view(dtf.data(), {R, Dn}), w[9]));
    float* hs = ssm.data_ptr<float>();
    jambalab::run_parts(N, R * Dn, threads, [&](int p, int np) {
      jambalab::state_update_part_bf16(p, np, hs, xc.data(), bf(dts), A.data_ptr<float>(), B.data(), C.data(),
                                       opt(Dsk), z.data(), yy.data(), R, Dn, N);
    });
    gemv(yy.data(), out_w, opt(out_b), y);
  }

  // Attention decode in bf16: q, k, v, row r's new K/V written at past[r] of its bf16 cache, torch's CPU
  // flash kernel over its past[r] + 1 keys with the GQA group folded into the query axis (model.py's
  // _attend_one_query, one row at a time as attend_rows), o_proj.
  void attention(const u16* x, const at::Tensor* w, int64_t H, int64_t Hk, int64_t hd, const int64_t* past,
                 const at::Tensor* k_rows, const at::Tensor* v_rows, u16* y) const {
    std::vector<u16> q(R * H * hd), k(R * Hk * hd), v(R * Hk * hd), o(R * H * hd);
    gemv(x, w[0], nullptr, q.data());
    gemv(x, w[1], nullptr, k.data());
    gemv(x, w[2], nullptr, v.data());
    for (int64_t r = 0; r < R; ++r) {
      u16 *kc = bf_mut(k_rows[r]), *vc = bf_mut(v_rows[r]);
      const int64_t sh = k_rows[r].stride(1), ss = k_rows[r].stride(2);
      for (int64_t h = 0; h < Hk; ++h) {
        std::memcpy(kc + h * sh + past[r] * ss, k.data() + (r * Hk + h) * hd, hd * 2);
        std::memcpy(vc + h * sh + past[r] * ss, v.data() + (r * Hk + h) * hd, hd * 2);
      }
      const int64_t S = past[r] + 1;
      const auto out = std::get<0>(at::_scaled_dot_product_flash_attention_for_cpu(
          view(q.data() + r * H * hd, {1, Hk, H / Hk, hd}), k_rows[r].narrow(2, 0, S), v_rows[r].narrow(2, 0, S)));
      std::memcpy(o.data() + r * H * hd, bf(out.contiguous()), H * hd * 2);
    }
    gemv(o.data(), w[3], nullptr, y);
  }
};

constexpr int kGlobal = 3, kSlots = 20, kMixer = 2, kFfn = 16, kMeta = 4, kLayerMeta = 4, kMaxRows = jambalab::kBf16DotRows;

}  // namespace

namespace jambalab {

// decode_step's arguments (step.cpp) for a bf16 model: every weight bf16 but the Mamba layers' A (fp32);
// no scales; meta[3] residual_in_fp32; states: conv (R, D, Kc) bf16 and ssm (R, D, N) fp32, K/V caches bf16.
at::Tensor decode_step_bf16(const at::Tensor& ids, at::TensorList weights, at::TensorList states, at::IntArrayRef meta,
                            at::IntArrayRef past, at::ArrayRef<double> eps) {
  const int threads = at::get_num_threads();
  const SerialAten serial;  // flash attention and the rest of ATen's ops: on this thread (step_common.h)
  const int64_t L = (meta.size() - kMeta) / kLayerMeta, R = ids.size(0);
  TORCH_CHECK(R <= kMaxRows, "decode_step: a bf16 model takes 1 to ", kMaxRows, " rows, got ", R);
  const bool fp32_residual = meta[3] != 0;
  int64_t bytes = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& t = weights[i];
    if (t.numel() == 0) continue;  // an absent weight or bias
    const bool is_a = i >= kGlobal && (i - kGlobal) % kSlots == kMixer + 10;
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu() && t.scalar_type() == (is_a ? at::kFloat : at::kBFloat16),
                "decode_step: weights[", i, "] of a bf16 model must be a contiguous CPU ", is_a ? "float32" : "bf16",
                " tensor, got ", t.scalar_type());
    bytes += t.nbytes();
  }
  for (int64_t i = 0, si = 0; i < L; ++i) {
    const int64_t* lm = &meta[kMeta + kLayerMeta * i];
    TORCH_CHECK(lm[1] != 2 || lm[2] <= 2, "decode_step: a bf16 model's MoE takes top_k <= 2");
    TORCH_CHECK(!fp32_residual || lm[1] == 0, "decode_step: a float32 residual is taken only without FFN layers");
    const int64_t n = lm[0] == 1 ? 2 * R : 2;
    for (int64_t j = si; j < si + n; ++j) {
      const bool ssm = lm[0] == 0 && j == si + 1;
      TORCH_CHECK(states[j].is_contiguous() && states[j].scalar_type() == (ssm ? at::kFloat : at::kBFloat16),
                  "decode_step: states[", j, "] of a bf16 model must be contiguous ", ssm ? "float32" : "bf16");
    }
    si += n;
  }
  const at::Tensor &embed = weights[0], &lm_head = weights[2];
  const auto [d, V, H, Hk, hd, norm_eps, inner_eps] = jambalab::StepDims(weights, meta, eps);

  Bf16Step step;
  step.R = R;
  step.threads = bytes >= kParallelStepBytes ? threads : 1;
  std::vector<float> h(R * d);  // the residual stream: bf16 values, or float32 ones (fp32_residual)
  std::vector<u16> hb(R * d), xn(R * d), y(R * d);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(id[r] >= 0 && id[r] < embed.size(0), "decode_step: token id ", id[r], " out of range");
    const u16* row = bf(embed) + id[r] * d;
    for (int64_t j = 0; j < d; ++j) h[r * d + j] = val(row[j]);
  }
  const auto add = [&](const u16* x) {  // h = residual + x
    for (int64_t j = 0; j < R * d; ++j) h[j] = fp32_residual ? h[j] + val(x[j]) : val(bits(h[j] + val(x[j])));
  };
  const auto norm = [&](const at::Tensor& w) {  // xn = norm(h.to(bf16))
    for (int64_t j = 0; j < R * d; ++j) hb[j] = bits(h[j]);
    rms_norm_rows_bf16(hb.data(), bf(w), xn.data(), R, d, norm_eps);
  };
  for (int64_t i = 0, si = 0; i < L; ++i) {
    const at::Tensor* w = &weights[kGlobal + kSlots * i];
    const int64_t* lm = &meta[kMeta + kLayerMeta * i];
    norm(w[0]);
    if (lm[0] == 1) {
      check_kv_rows(&states[si], R, Hk, hd, past.data());
      step.attention(xn.data(), w + kMixer, H, Hk, hd, past.data(), &states[si], &states[si + R], y.data());
      si += 2 * R;
    } else {
      at::Tensor conv = states[si], ssm = states[si + 1];
      step.mamba(xn.data(), w + kMixer, lm[3] != 0, inner_eps, conv, ssm, y.data());
      si += 2;
    }
    add(y.data());
    if (lm[1] == 0) continue;
    norm(w[1]);
    if (lm[1] == 1) {
      step.mlp(xn.data(), R, w[kFfn], w[kFfn + 1], w[kFfn + 2], y.data());
    } else {
      step.moe(xn.data(), w + kFfn, lm[2], d, y.data());
    }
    add(y.data());
  }
  // norm_f(h).to(bf16): a bf16 h normalised in bf16; a float32 one in float32 (bf16 weight), then rounded.
  if (fp32_residual) {
    std::vector<float> nf(R * d);
    rms_norm_rows_f32_bf16w(h.data(), bf(weights[1]), nf.data(), R, d, norm_eps);
    for (int64_t j = 0; j < R * d; ++j) xn[j] = bits(nf[j]);
  } else {
    norm(weights[1]);
  }
  std::vector<u16> logits(R * V);
  step.gemv(xn.data(), lm_head, nullptr, logits.data());
  at::Tensor out = at::empty({R, V}, at::TensorOptions().dtype(at::kFloat));  // lm_head(h).float()
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < R * V; ++i) op[i] = val(logits[i]);
  return out;
}

}  // namespace jambalab
