// A whole decode step, all layers, in one op call: token ids (R,) -> logits (R, V), the cache's
// states updated in place (a bf16 model, whose embedding is bf16: step_bf16.cpp).
// Float32 activations and states, CPU, 1 to 16 rows, one new token each, no
// padding; each row at its own position (past[r] cached tokens: a plain batch or the serving engine's
// ragged slots). Weight matrices are float32, bf16 (weight-only bf16: x rounded to bf16, exact products,
// fp32 sums, as the gemv op), or int8 / 4-bit with fp16 group scales (quant.py's formats; scales[i]
// beside weights[i], empty for a float one): those multiply as wgemv_a8 does (x rounded to int8 per
// block of 32, the int8-activation mode), in the layer path's blocks of 4 rows.
//
// Legend: R rows, d d_model, D d_inner, N d_state, Rk dt_rank, Kc d_conv, H heads, Hk KV heads,
// hd head_dim, S attended keys, E experts, F d_ff, V vocab.
//
// Why: on a small model the cost of a decode token is not the weights but the ~40 op calls around
// them (Python, dispatcher, allocation): tiny-hybrid (0.35M parameters) took ~1.9 ms a token where
// llama.cpp takes 0.26 ms. And each multithreaded kernel ended in an OpenMP barrier: with another
// process busy on one core, the barrier waits for a descheduled thread (a scheduler time slice,
// milliseconds) and a 2-thread decode ran 34x slower. Here:
// - the layers run the same raw kernels, in the same order, on the same row splits as the
//   layer-by-layer path (jambalab/model.py through mamba_decode / mlp_decode / moe_decode /
//   decode_attention, its twin), so the logits are bitwise the same; only silu, the router's
//   softmax and top-k call ATen (on the same shapes as that path, for the same bits);
// - every GEMV reads its weight once for all R rows (gemv_outputs), and an MoE layer runs each
//   expert once on the rows routed to it: a batch of 8 rows reads about what 1 row reads;
// - work is shared through StepPool: a job is split into small tasks that threads *claim*; the
//   caller claims too and waits only for tasks another thread has started, never for a thread
//   that is not running. A job below kParallelBytes of weights runs on the caller alone, and so
//   does a whole step whose weights are below kParallelStepBytes (tiny models never wake a thread).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <utility>
#include <vector>

#include "kernels.h"      // gemv_outputs, A8Rows, the update parts, DecodeAttention
#include "step_common.h"  // StepPool, split_outputs, run_parts, Routing, check_kv_rows

namespace {

// ---------------------------------------------------------------- the step

const float* ptr(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

// A weight matrix (N, K): float32, bf16, or int8 (N, K) / 4-bit uint8 (N, K / 2) with fp16 scales (N, K / G).
struct Mat {
  const void* w = nullptr;
  const c10::Half* s = nullptr;
  int64_t N = 0, K = 0, G = 0, row_bytes = 0;
  bool quantized = false, int4 = false, bf16 = false;
  int64_t bytes() const { return N * row_bytes + (quantized ? N * (K / G) * 2 : 0); }
};

Mat mat(const at::Tensor& w, const at::Tensor& s) {
  Mat m;
  m.w = w.data_ptr();
  m.N = w.size(0);
  m.quantized = s.numel() > 0;
  m.int4 = w.scalar_type() == at::kByte;
  m.bf16 = w.scalar_type() == at::kBFloat16;
  m.K = m.int4 ? 2 * w.size(1) : w.size(1);
  m.row_bytes = w.size(1) * w.element_size();
  if (m.quantized) {
    m.s = s.data_ptr<c10::Half>();
    m.G = m.K / s.size(1);
  }
  return m;
}

// out = v * w (first) or out + v * w, the product rounded before the sum as ATen's mul then add in
// moe_decode: GCC would otherwise contract the two into one FMA (GNU C++ defaults to fp-contract=fast).
__attribute__((optimize("fp-contract=off"))) void add_scaled(float* out, const float* v, float w, int64_t n,
                                                             bool first) {
  for (int64_t i = 0; i < n; ++i) out[i] = first ? v[i] * w : out[i] + v[i] * w;
}

struct Step {
  int64_t R = 0;
  int threads = 1;

  // body(lo, hi) over the outputs of m, on the pool when large enough (split_outputs).
  template <typename F>
  void outputs(const Mat& m, const F& body) const {
    jambalab::split_outputs(m.N, m.bytes(), m.row_bytes, threads, body);
  }

  // x (R, K) rounded to int8 for a quantized m's kind, in qlinear's blocks of 4 rows.
  std::vector<jambalab::A8Rows> quantize(const float* x, const Mat& m) const {
    std::vector<jambalab::A8Rows> blocks;
    for (int64_t r = 0; r < R; r += 4) blocks.emplace_back(x + r * m.K, std::min<int64_t>(4, R - r), m.K, m.int4);
    return blocks;
  }

  // y (R, N) = x (R, K) @ m^T + b. A quantized m takes x already quantized (`pre`, from quantize(x, m)
  // for a matrix of the same kind and K) or quantizes it here.
  void gemv(const float* x, const Mat& m, const float* b, float* y,
            const std::vector<jambalab::A8Rows>* pre = nullptr) const {
    if (m.bf16) {
      const auto* wp = static_cast<const uint16_t*>(m.w);
      const jambalab::Bf16Rows xb(x, R, m.K);
      outputs(m, [&](int64_t lo, int64_t hi) { xb.outputs(wp, b, y, m.N, lo, hi); });
      return;
    }
    if (!m.quantized) {
      const float* wp = static_cast<const float*>(m.w);
      outputs(m, [&](int64_t lo, int64_t hi) { jambalab::gemv_outputs(x, R, wp, b, y, m.K, m.N, lo, hi); });
      return;
    }
    std::vector<jambalab::A8Rows> own;
    if (pre == nullptr) own = quantize(x, m), pre = &own;
    for (size_t i = 0; i < pre->size(); ++i) {
      const jambalab::A8Rows& q = (*pre)[i];
      float* yb = y + static_cast<int64_t>(i) * 4 * m.N;
      outputs(m, [&](int64_t lo, int64_t hi) { q.outputs(m.w, m.s, m.G, b, yb, m.N, lo, hi); });
    }
  }

  // The same x through several matrices (gate and up; q, k and v): quantized once when all of them
  // are quantized alike, else each on its own.
  void gemv_same_x(const float* x, std::initializer_list<std::pair<Mat, float*>> mats) const {
    const Mat& first = mats.begin()->first;
    bool shared = true;
    for (const auto& [m, y] : mats) shared = shared && m.quantized && m.int4 == first.int4 && m.K == first.K;
    std::vector<jambalab::A8Rows> q;
    if (shared) q = quantize(x, first);
    for (const auto& [m, y] : mats) gemv(x, m, nullptr, y, shared ? &q : nullptr);
  }

  // silu(g) * u in place in g, (rows, F): ATen's silu_ on the same shape as model.swiglu / decode.cpp.
  static void swiglu(float* g, const float* u, int64_t rows, int64_t F) {
    at::Tensor gt = at::from_blob(g, {rows, F}, at::TensorOptions().dtype(at::kFloat));
    at::silu_(gt);
    for (int64_t i = 0; i < rows * F; ++i) g[i] *= u[i];
  }

  // down(silu(gate(x)) * up(x)) for `rows` rows of x.
  void mlp(const float* x, int64_t rows, const Mat& wg, const Mat& wu, const Mat& wd, float* y) const {
    const int64_t F = wg.N;
    std::vector<float> g(rows * F), u(rows * F);
    Step one = *this;
    one.R = rows;
    one.gemv_same_x(x, {{wg, g.data()}, {wu, u.data()}});
    swiglu(g.data(), u.data(), rows, F);
    one.gemv(g.data(), wd, nullptr, y);
  }

  // MoE.forward / moe_decode: softmax router, top-k not renormalised, experts summed in ascending id order.
  // Each expert runs once on the rows routed to it (its weights read once); a row's output is what
  // moe_decode computes for it alone (the GEMV's rows are independent, silu runs per row as there).
  void moe(const float* x, const at::Tensor* w, const at::Tensor* sc, int64_t top_k, int64_t d, float* y) const {
    const at::Tensor &wg = w[1], &wu = w[2], &wd = w[3];
    const int64_t E = w[0].size(0), F = wg.size(1);
    at::Tensor logits = at::empty({R, E}, at::TensorOptions().dtype(at::kFloat));
    gemv(x, mat(w[0], sc[0]), nullptr, logits.data_ptr<float>());
    const auto expert = [&](const at::Tensor& stack, const at::Tensor& scales, int64_t e) {
      return mat(stack.select(0, e), scales.numel() ? scales.select(0, e) : scales);
    };
    const auto [weights, experts] = at::topk(at::softmax(logits, -1, at::kFloat), top_k, -1);  // (R, k)
    const auto wts = weights.accessor<float, 2>();
    const jambalab::Routing routing(experts, E);
    std::vector<float> ye(R * top_k * d);  // row r's k-th choice at (r * top_k + k) * d
    std::vector<float> xe, g, u, out;
    for (int64_t e = 0; e < E; ++e) {
      const std::vector<int64_t>& slots = routing.slots[e];
      if (slots.empty()) continue;
      const int64_t n = static_cast<int64_t>(slots.size());
      xe.resize(n * d), g.resize(n * F), u.resize(n * F), out.resize(n * d);
      for (int64_t i = 0; i < n; ++i) std::memcpy(xe.data() + i * d, x + slots[i] / top_k * d, d * 4);
      Step some = *this;
      some.R = n;
      some.gemv_same_x(xe.data(), {{expert(wg, sc[1], e), g.data()}, {expert(wu, sc[2], e), u.data()}});
      for (int64_t i = 0; i < n; ++i) swiglu(g.data() + i * F, u.data() + i * F, 1, F);
      some.gemv(g.data(), expert(wd, sc[3], e), nullptr, out.data());
      for (int64_t i = 0; i < n; ++i) std::memcpy(ye.data() + slots[i] * d, out.data() + i * d, d * 4);
    }
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t k = routing.order[r][j];
        add_scaled(y + r * d, ye.data() + (r * top_k + k) * d, wts[r][k], d, j == 0);
      }
    }
  }

  // MambaMixer decode (mamba_decode): x (R, d) -> y (R, d); conv (R, D, Kc), ssm (R, D, N) in place.
  void mamba(const float* x, const at::Tensor* w, const at::Tensor* sc, bool inner_norm, float inner_eps,
             at::Tensor& conv, at::Tensor& ssm, float* y) const {
    const at::Tensor &in_w = w[0], &conv_w = w[2], &x_proj = w[4], &dt_proj = w[8], &A = w[10], &Dsk = w[11],
                     &out_w = w[12];
    const int64_t Dn = ssm.size(1), N = ssm.size(2), Kc = conv.size(2), Rk = dt_proj.size(1), Wd = Rk + 2 * N;
    std::vector<float> xz(R * 2 * Dn), xs(R * Dn), z(R * Dn), xc(R * Dn), dbc(R * Wd), dt(R * Rk), B(R * N),
        C(R * N), dtf(R * Dn), dts(R * Dn), yy(R * Dn);
    gemv(x, mat(in_w, sc[0]), ptr(w[1]), xz.data());
    for (int64_t r = 0; r < R; ++r) {  // the x and z halves, as contiguous (R, D) blocks
      std::memcpy(xs.data() + r * Dn, xz.data() + r * 2 * Dn, Dn * 4);
      std::memcpy(z.data() + r * Dn, xz.data() + r * 2 * Dn + Dn, Dn * 4);
    }
    float* cs = conv.data_ptr<float>();
    jambalab::run_parts(Kc, R * Dn, threads, [&](int p, int np) {
      jambalab::conv_update_part(p, np, xs.data(), cs, conv_w.data_ptr<float>(), ptr(w[3]), xc.data(), R, Dn, Kc);
    });
    gemv(xc.data(), mat(x_proj, sc[4]), nullptr, dbc.data());
    for (int64_t r = 0; r < R; ++r) {
      std::memcpy(dt.data() + r * Rk, dbc.data() + r * Wd, Rk * 4);
      std::memcpy(B.data() + r * N, dbc.data() + r * Wd + Rk, N * 4);
      std::memcpy(C.data() + r * N, dbc.data() + r * Wd + Rk + N, N * 4);
    }
    if (inner_norm) {
      jambalab::rms_norm_rows(dt.data(), ptr(w[5]), dt.data(), R, Rk, inner_eps);
      jambalab::rms_norm_rows(B.data(), ptr(w[6]), B.data(), R, N, inner_eps);
      jambalab::rms_norm_rows(C.data(), ptr(w[7]), C.data(), R, N, inner_eps);
    }
    gemv(dt.data(), mat(dt_proj, sc[8]), nullptr, dtf.data());
    jambalab::dt_softplus_rows(dtf.data(), w[9].data_ptr<float>(), dts.data(), R, Dn);
    float* hs = ssm.data_ptr<float>();
    jambalab::run_parts(N, R * Dn, threads, [&](int p, int np) {
      jambalab::state_update_part(p, np, hs, xc.data(), dts.data(), A.data_ptr<float>(), B.data(), C.data(),
                                  ptr(Dsk), z.data(), yy.data(), R, Dn, N);
    });
    gemv(yy.data(), mat(out_w, sc[12]), ptr(w[13]), y);
  }

  // Attention decode: q, k, v projections, row r's new K/V written at past[r] of its own cache,
  // decode attention over its past[r] + 1 keys (decode_attention on that row alone), o_proj.
  // k_rows[r], v_rows[r]: (1, Hk, capacity_r, hd).
  void attention(const float* x, const at::Tensor* w, const at::Tensor* sc, int64_t H, int64_t Hk, int64_t hd,
                 const int64_t* past, const at::Tensor* k_rows, const at::Tensor* v_rows, float* y) const {
    std::vector<float> q(R * H * hd), k(R * Hk * hd), v(R * Hk * hd), o(R * H * hd);
    gemv_same_x(x, {{mat(w[0], sc[0]), q.data()}, {mat(w[1], sc[1]), k.data()}, {mat(w[2], sc[2]), v.data()}});
    std::vector<jambalab::DecodeAttention> att(R);
    std::vector<int64_t> first(R + 1, 0);  // row r's tasks are [first[r], first[r + 1])
    int64_t kv_bytes = 0;
    for (int64_t r = 0; r < R; ++r) {
      float *kc = k_rows[r].data_ptr<float>(), *vc = v_rows[r].data_ptr<float>();
      const int64_t sb = k_rows[r].stride(0), sh = k_rows[r].stride(1), ss = k_rows[r].stride(2);
      for (int64_t h = 0; h < Hk; ++h) {
        std::memcpy(kc + h * sh + past[r] * ss, k.data() + (r * Hk + h) * hd, hd * 4);
        std::memcpy(vc + h * sh + past[r] * ss, v.data() + (r * Hk + h) * hd, hd * 4);
      }
      jambalab::DecodeAttention& a = att[r];
      a.B = 1, a.H = H, a.Hk = Hk, a.S = past[r] + 1, a.hd = hd;
      a.k = {kc, sb, sh, ss};
      a.v = {vc, sb, sh, ss};
      a.prepare(q.data() + r * H * hd);
      first[r + 1] = first[r] + a.tasks();
      kv_bytes += 8 * Hk * a.S * hd;
    }
    const auto run = [&](int64_t t) {
      const int64_t r = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
      att[r].run(t - first[r]);
    };
    if (threads > 1 && kv_bytes >= jambalab::kParallelBytes) {
      jambalab::StepPool::get().run(first[R], threads, run);
    } else {
      for (int64_t t = 0; t < first[R]; ++t) run(t);
    }
    for (int64_t r = 0; r < R; ++r) att[r].merge(o.data() + r * H * hd);
    gemv(o.data(), mat(w[3], sc[3]), nullptr, y);
  }
};

constexpr int kGlobal = 3;   // embed, norm_f, lm_head
constexpr int kSlots = 20;   // per layer: norm1, norm2, 14 mixer slots, 4 FFN slots
constexpr int kMixer = 2, kFfn = 16;
constexpr int kMeta = 4;     // n_heads, n_kv_heads, head_dim, residual_in_fp32 (read by step_bf16.cpp)
constexpr int kLayerMeta = 4;  // mixer (0 Mamba, 1 attention), ffn (0 none, 1 MLP, 2 MoE), top_k, inner_norm

constexpr int kMaxRows = 16;

// states: per Mamba layer conv (R, D, Kc) and ssm (R, D, N); per attention layer R K caches then R
// V caches, each (1, Hk, capacity, hd). past (R,): the tokens each row already holds.
// weights[i] float32 (any slot), bf16 (a matrix), or int8 / uint8 (4-bit) with scales[i] fp16 (its rows, K / G);
// scales[i] empty for float. A bf16 tensor in a slot the step reads as float32 (a norm, a bias) is refused
// where it is read (data_ptr<float>).
void check_weight(const at::Tensor& w, const at::Tensor& s, size_t i) {
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), "decode_step: weights[", i, "] must be a contiguous CPU tensor");
  if (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(s.numel() == 0, "decode_step: weights[", i, "] is ", w.scalar_type(), " but has scales");
    TORCH_CHECK(w.scalar_type() == at::kFloat || w.dim() >= 2, "decode_step: weights[", i, "] is bf16 but not a matrix");
    return;
  }
  TORCH_CHECK(w.scalar_type() == at::kChar || w.scalar_type() == at::kByte,
              "decode_step: weights[", i, "] must be float32, bf16, int8 or uint8 (4-bit), got ", w.scalar_type());
  const int64_t K = w.scalar_type() == at::kByte ? 2 * w.size(-1) : w.size(-1);
  TORCH_CHECK(w.dim() >= 2 && s.scalar_type() == at::kHalf && s.is_contiguous() && s.dim() == w.dim() &&
                  s.sizes().slice(0, s.dim() - 1) == w.sizes().slice(0, w.dim() - 1) && s.size(-1) > 0 &&
                  K % s.size(-1) == 0 && (K / s.size(-1)) % 32 == 0,
              "decode_step: weights[", i, "] ", w.sizes(), " needs fp16 scales (rows, K / G) with G a multiple of 32, got ",
              s.sizes(), " ", s.scalar_type());
}

at::Tensor decode_step(const at::Tensor& ids, at::TensorList weights, at::TensorList scales, at::TensorList states,
                       at::IntArrayRef meta, at::IntArrayRef past, at::ArrayRef<double> eps) {
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.size(0) >= 1 && ids.size(0) <= kMaxRows,
              "decode_step: ids must be int64 (R,) with 1 <= R <= ", kMaxRows, ", got ", ids.sizes());
  TORCH_CHECK(static_cast<int64_t>(past.size()) == ids.size(0), "decode_step: past must hold one length per row");
  TORCH_CHECK(meta.size() >= kMeta && (meta.size() - kMeta) % kLayerMeta == 0 && eps.size() == 2,
              "decode_step: bad meta");
  const int64_t L = (meta.size() - kMeta) / kLayerMeta;
  const int64_t R = ids.size(0);
  int64_t n_states = 0;
  for (int64_t i = 0; i < L; ++i) n_states += meta[kMeta + kLayerMeta * i] == 1 ? 2 * R : 2;
  TORCH_CHECK(weights.size() == static_cast<size_t>(kGlobal + kSlots * L) && scales.size() == weights.size() &&
                  states.size() == static_cast<size_t>(n_states),
              "decode_step: ", L, " layers need ", kGlobal + kSlots * L, " weights, as many scales and ", n_states,
              " states");
  if (weights[0].scalar_type() == at::kBFloat16) {  // a bf16 model: bf16 activations (step_bf16.cpp)
    for (const at::Tensor& s : scales) TORCH_CHECK(s.numel() == 0, "decode_step: a bf16 model has no scales");
    return jambalab::decode_step_bf16(ids, weights, states, meta, past, eps);
  }
  int64_t bytes = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    check_weight(weights[i], scales[i], i);
    bytes += weights[i].nbytes() + scales[i].nbytes();
  }
  TORCH_CHECK(weights[0].scalar_type() == at::kFloat && weights[1].scalar_type() == at::kFloat,
              "decode_step: the embedding and the final norm must be float32");
  for (const at::Tensor& t : states)
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu() && t.dim() >= 3 &&
                    (t.size(0) == R || (t.dim() == 4 && t.size(0) == 1)),
                "decode_step: states must be contiguous float32 CPU tensors of the batch's rows");
  const at::Tensor &embed = weights[0], &lm_head = weights[2];
  const auto [d, V, H, Hk, hd, norm_eps, inner_eps] = jambalab::StepDims(weights, meta, eps);

  Step step;
  step.R = R;
  step.threads = bytes >= jambalab::kParallelStepBytes ? at::get_num_threads() : 1;
  std::vector<float> h(R * d), xn(R * d), y(R * d);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(id[r] >= 0 && id[r] < embed.size(0), "decode_step: token id ", id[r], " out of range");
    std::memcpy(h.data() + r * d, embed.data_ptr<float>() + id[r] * d, d * 4);
  }
  for (int64_t i = 0, si = 0; i < L; ++i) {
    const at::Tensor* w = &weights[kGlobal + kSlots * i];
    const at::Tensor* sc = &scales[kGlobal + kSlots * i];
    const int64_t* lm = &meta[kMeta + kLayerMeta * i];
    jambalab::rms_norm_rows(h.data(), ptr(w[0]), xn.data(), R, d, norm_eps);
    if (lm[0] == 1) {
      jambalab::check_kv_rows(&states[si], R, Hk, hd, past.data());
      step.attention(xn.data(), w + kMixer, sc + kMixer, H, Hk, hd, past.data(), &states[si], &states[si + R], y.data());
      si += 2 * R;
    } else {
      at::Tensor conv = states[si], ssm = states[si + 1];
      step.mamba(xn.data(), w + kMixer, sc + kMixer, lm[3] != 0, inner_eps, conv, ssm, y.data());
      si += 2;
    }
    for (int64_t j = 0; j < R * d; ++j) h[j] = h[j] + y[j];
    if (lm[1] == 0) continue;
    jambalab::rms_norm_rows(h.data(), ptr(w[1]), xn.data(), R, d, norm_eps);
    if (lm[1] == 1) {
      step.mlp(xn.data(), R, mat(w[kFfn], sc[kFfn]), mat(w[kFfn + 1], sc[kFfn + 1]), mat(w[kFfn + 2], sc[kFfn + 2]),
               y.data());
    } else {
      step.moe(xn.data(), w + kFfn, sc + kFfn, lm[2], d, y.data());
    }
    for (int64_t j = 0; j < R * d; ++j) h[j] = h[j] + y[j];
  }
  jambalab::rms_norm_rows(h.data(), ptr(weights[1]), xn.data(), R, d, norm_eps);
  at::Tensor logits = at::empty({R, V}, embed.options());
  step.gemv(xn.data(), mat(lm_head, scales[2]), nullptr, logits.data_ptr<float>());
  return logits;
}

}  // namespace

bool bf16dot_native() { return jambalab::bf16dot_native(); }

// set_aten_threads (step_common.h) for Python: cpu.one_aten_thread around the small ops between decode
// steps. Returns the previous (OpenMP, MKL thread-local) counts, to be set back.
std::vector<int64_t> aten_threads(int64_t omp, int64_t mkl_local) {
  TORCH_CHECK(omp >= 1 && mkl_local >= 0, "aten_threads: omp >= 1 and mkl_local >= 0, got ", omp, ", ", mkl_local);
  const auto [previous_omp, previous_mkl] = jambalab::set_aten_threads(static_cast<int>(omp), static_cast<int>(mkl_local));
  return {previous_omp, previous_mkl};
}

TORCH_LIBRARY_FRAGMENT(jambalab_kernels, m) {
  m.def("bf16dot_native() -> bool", &bf16dot_native);
  m.def("aten_threads(int omp, int mkl_local) -> int[]", &aten_threads);
  m.def("decode_step(Tensor ids, Tensor[] weights, Tensor[] scales, Tensor(a!)[] states, int[] meta, int[] past, "
        "float[] eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(jambalab_kernels, CPU, m) {
  m.impl("decode_step", &decode_step);
}
