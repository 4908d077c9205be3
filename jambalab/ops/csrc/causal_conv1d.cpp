// Fused CPU depthwise causal conv1d + silu, forward and backward, in the (B, L, D)
// layout the Mamba mixer keeps its activations in. The pure-PyTorch twin is
// causal_conv1d_ref in jambalab/ops/conv_ref.py; jambalab/ops/fused.py wraps these.
//
// Legend: B batch, L length, D d_inner (channels), K d_conv (taps).
//
//   pre[b, t, d] = bias[d] + sum_k w[d, k] * x[b, t - (K - 1) + k, d]
//   out          = silu(pre)
//
// x at times t < 0 comes from conv_state (B, D, K), HF's layout: the last K inputs
// before this call, the newest at column K - 1 (so time s < 0 is column K + s),
// or zeros when there is no state.
//
// Why a kernel: F.conv1d wants (B, D, L), so the reference transposes in and out,
// and oneDNN's depthwise backward alone took 9% of a small hybrid's training step
// (d_model 64, 2048 tokens; docs/benchmarks.md). Here every loop runs along D,
// contiguous in memory, and the compiler vectorises it; the weight is transposed
// once to (K, D). silu is fused into the forward, its derivative into the backward
// (pre is recomputed there rather than stored).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"
#include "simd.h"  // exp2_fast

namespace {

constexpr int64_t kMaxTaps = 16;

inline float to_f(float v) { return v; }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }
template <typename T>
inline T from_f(float v) {
  return static_cast<T>(v);
}

inline float sigmoid(float v) { return 1.0f / (1.0f + exp2_fast(v * -1.4426950408889634f)); }

template <typename F>
void dispatch(at::ScalarType st, const char* op, const F& f) {
  if (st == at::kFloat) {
    f(float{});
  } else if (st == at::kBFloat16) {
    f(c10::BFloat16{});
  } else {
    TORCH_CHECK(false, op, ": expected float32 or bfloat16, got ", st);
  }
}

struct Shape {
  int64_t B, L, D, K, row;  // row: x's stride between time steps (>= D: a view of in_proj's output)
};

Shape check(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
            const std::optional<at::Tensor>& state, const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, L, D), got ", x.sizes());
  TORCH_CHECK(x.stride(2) == 1 && x.stride(0) == x.size(1) * x.stride(1), op,
              ": x needs a contiguous last dim and evenly strided rows, got strides ", x.strides());
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.dim() == 2, op,
              ": weight must be contiguous float32 (D, K)");
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), K = weight.size(1);
  TORCH_CHECK(weight.size(0) == D, op, ": weight ", weight.sizes(), " does not match D=", D);
  TORCH_CHECK(K >= 1 && K <= kMaxTaps, op, ": d_conv must lie in [1, ", kMaxTaps, "], got ", K);
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == D, op,
                ": bias must be contiguous float32 (D,)");
  }
  if (state) {
    TORCH_CHECK(state->scalar_type() == x.scalar_type() && state->is_contiguous() && state->dim() == 3 &&
                    state->size(0) == B && state->size(1) == D && state->size(2) == K,
                op, ": conv_state must be contiguous (B, D, K) = (", B, ", ", D, ", ", K, ") in x's dtype, got ",
                state->sizes(), " ", state->scalar_type());
  }
  return {B, L, D, K, x.stride(1)};
}

// (D, K) -> (K, D), so that every tap is a contiguous row over channels.
std::vector<float> taps_by_row(const at::Tensor& weight, int64_t D, int64_t K) {
  std::vector<float> wt(K * D);
  const float* w = weight.data_ptr<float>();
  for (int64_t d = 0; d < D; ++d)
    for (int64_t k = 0; k < K; ++k) wt[k * D + d] = w[d * K + k];
  return wt;
}

// The K input rows feeding output time t of batch row b: pointers into x or, for
// t - (K - 1) + k < 0, into a per-batch transposed copy of conv_state (or zeros).
template <typename T>
struct Inputs {
  const T* x;
  const Shape& s;
  const T* hist;  // (B, K, D): conv_state transposed, or null
  const T* zeros;

  const T* row(int64_t b, int64_t src) const {
    if (src >= 0) return x + b * s.L * s.row + src * s.row;
    if (hist == nullptr) return zeros;
    return hist + (b * s.K + (s.K + src)) * s.D;
  }
};

template <typename T>
std::vector<T> history(const std::optional<at::Tensor>& state, const Shape& s) {
  std::vector<T> hist;
  if (!state) return hist;
  hist.resize(s.B * s.K * s.D);
  const T* st = state->data_ptr<T>();
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t d = 0; d < s.D; ++d)
      for (int64_t k = 0; k < s.K; ++k) hist[(b * s.K + k) * s.D + d] = st[(b * s.D + d) * s.K + k];
  return hist;
}

// pre for one (b, t) row into acc[0, D).
template <typename T>
inline void conv_row(const Inputs<T>& in, const float* wt, const float* bias, int64_t b, int64_t t, float* acc) {
  const Shape& s = in.s;
  for (int64_t d = 0; d < s.D; ++d) acc[d] = bias ? bias[d] : 0.0f;
  for (int64_t k = 0; k < s.K; ++k) {
    const T* xr = in.row(b, t - (s.K - 1) + k);
    const float* wk = wt + k * s.D;
    for (int64_t d = 0; d < s.D; ++d) acc[d] += wk[d] * to_f(xr[d]);
  }
}

int64_t grain(const Shape& s) { return std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, s.D * s.K)); }

at::Tensor conv_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& conv_state) {
  const Shape s = check(x, weight, bias, conv_state, "causal_conv1d");
  auto out = at::empty({s.B, s.L, s.D}, x.options());
  const std::vector<float> wt = taps_by_row(weight, s.D, s.K);
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  dispatch(x.scalar_type(), "causal_conv1d", [&](auto tag) {
    using T = decltype(tag);
    const std::vector<T> hist = history<T>(conv_state, s);
    const std::vector<T> zeros(s.D, from_f<T>(0.0f));
    const Inputs<T> in{x.data_ptr<T>(), s, hist.empty() ? nullptr : hist.data(), zeros.data()};
    T* op = out.data_ptr<T>();
    at::parallel_for(0, s.B * s.L, grain(s), [&](int64_t lo, int64_t hi) {
      std::vector<float> acc(s.D);
      for (int64_t r = lo; r < hi; ++r) {
        conv_row(in, wt.data(), bp, r / s.L, r % s.L, acc.data());
        T* o = op + r * s.D;
        for (int64_t d = 0; d < s.D; ++d) o[d] = from_f<T>(acc[d] * sigmoid(acc[d]));
      }
    });
  });
  return out;
}

// Gradients of silu(conv(x)) for x, weight and bias, given dout (B, L, D) contiguous.
// Pass 1 (rows in parallel): gpre = dout * silu'(pre) into an fp32 buffer, and per-thread
// partial sums of dw (K, D) and dbias (D,). Pass 2 (rows in parallel): dx from gpre.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bwd(const at::Tensor& x, const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         const std::optional<at::Tensor>& conv_state,
                                                         const at::Tensor& dout) {
  const Shape s = check(x, weight, bias, conv_state, "causal_conv1d backward");
  TORCH_CHECK(dout.scalar_type() == x.scalar_type() && dout.is_contiguous() && dout.sizes() == x.sizes(),
              "causal_conv1d backward: dout must be contiguous, shaped and typed as x");
  auto dx = at::empty({s.B, s.L, s.D}, x.options());
  auto gpre = at::empty({s.B, s.L, s.D}, x.options().dtype(at::kFloat));
  const int threads = at::get_num_threads();
  auto parts = at::zeros({threads, s.K + 1, s.D}, x.options().dtype(at::kFloat));  // per thread: dw rows, dbias
  const std::vector<float> wt = taps_by_row(weight, s.D, s.K);
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  dispatch(x.scalar_type(), "causal_conv1d backward", [&](auto tag) {
    using T = decltype(tag);
    const std::vector<T> hist = history<T>(conv_state, s);
    const std::vector<T> zeros(s.D, from_f<T>(0.0f));
    const Inputs<T> in{x.data_ptr<T>(), s, hist.empty() ? nullptr : hist.data(), zeros.data()};
    const T* gop = dout.data_ptr<T>();
    float* gp = gpre.data_ptr<float>();
    float* pp = parts.data_ptr<float>();
    at::parallel_for(0, s.B * s.L, grain(s), [&](int64_t lo, int64_t hi) {
      float* part = pp + at::get_thread_num() * (s.K + 1) * s.D;
      float* db = part + s.K * s.D;
      std::vector<float> acc(s.D);
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t b = r / s.L, t = r % s.L;
        conv_row(in, wt.data(), bp, b, t, acc.data());
        const T* go = gop + r * s.D;
        float* g = gp + r * s.D;
        for (int64_t d = 0; d < s.D; ++d) {
          const float sg = sigmoid(acc[d]);
          g[d] = to_f(go[d]) * sg * (1.0f + acc[d] * (1.0f - sg));  // silu'(p) = sg * (1 + p (1 - sg))
          db[d] += g[d];
        }
        for (int64_t k = 0; k < s.K; ++k) {
          const T* xr = in.row(b, t - (s.K - 1) + k);
          float* dwk = part + k * s.D;
          for (int64_t d = 0; d < s.D; ++d) dwk[d] += g[d] * to_f(xr[d]);
        }
      }
    });
    T* dxp = dx.data_ptr<T>();
    at::parallel_for(0, s.B * s.L, grain(s), [&](int64_t lo, int64_t hi) {
      std::vector<float> acc(s.D);
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t b = r / s.L, t = r % s.L;
        std::fill(acc.begin(), acc.end(), 0.0f);
        // x at time t feeds outputs t + (K - 1) - k, for those inside [0, L).
        for (int64_t k = 0; k < s.K; ++k) {
          const int64_t u = t + (s.K - 1) - k;
          if (u >= s.L) continue;
          const float* g = gp + (b * s.L + u) * s.D;
          const float* wk = wt.data() + k * s.D;
          for (int64_t d = 0; d < s.D; ++d) acc[d] += wk[d] * g[d];
        }
        T* o = dxp + r * s.D;
        for (int64_t d = 0; d < s.D; ++d) o[d] = from_f<T>(acc[d]);
      }
    });
  });
  auto summed = parts.sum(0);                                             // (K + 1, D)
  auto dweight = summed.narrow(0, 0, s.K).t().contiguous();               // (D, K)
  auto dbias = summed.select(0, s.K).contiguous();                        // (D,)
  return {dx, dweight, dbias};
}

// ---------------------------------------------------------------- softplus(dt + bias)

// log1p(e) for e in [0, 1]: with t = e / (2 + e) in [0, 1/3], log1p(e) = 2 atanh(t)
// = 2 (t + t^3/3 + t^5/5 + ...); the series to t^13 is within 5e-8 relative.
inline float log1p_unit(float e) {
  const float t = e / (2.0f + e), t2 = t * t;
  float p = 1.0f / 13.0f;
  p = p * t2 + 1.0f / 11.0f;
  p = p * t2 + 1.0f / 9.0f;
  p = p * t2 + 1.0f / 7.0f;
  p = p * t2 + 1.0f / 5.0f;
  p = p * t2 + 1.0f / 3.0f;
  p = p * t2 + 1.0f;
  return 2.0f * t * p;
}

// softplus(v) = max(v, 0) + log1p(exp(-|v|)): no overflow, exactly v in fp32 for v > 17, and
// within 2e-6 relative of F.softplus down to v = -87 (the error of rounding v log2(e) to fp32).
inline float softplus(float v) {
  const float a = v < 0.0f ? -v : v;
  const float e = a > 87.0f ? 0.0f : exp2_fast(a * -1.4426950408889634f);  // below fp32's normal range: 0
  return (v > 0.0f ? v : 0.0f) + log1p_unit(e);
}

void check_dt(const at::Tensor& dt, const at::Tensor& bias, const char* op) {
  TORCH_CHECK(dt.scalar_type() == at::kFloat && dt.is_contiguous(), op, ": dt must be contiguous float32");
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.dim() == 1 &&
                  dt.dim() >= 1 && bias.size(0) == dt.size(-1),
              op, ": bias must be contiguous float32 (", dt.dim() ? dt.size(-1) : 0, ",), got ", bias.sizes());
}

}  // namespace

namespace jambalab {

// out = softplus(dt + bias), bias broadcast over the last dim.
at::Tensor dt_softplus_fwd(const at::Tensor& dt, const at::Tensor& bias) {
  check_dt(dt, bias, "dt_softplus");
  auto out = at::empty(dt.sizes(), dt.options());
  const int64_t D = bias.size(0), rows = D ? dt.numel() / D : 0;
  const float *x = dt.data_ptr<float>(), *b = bias.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, D)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t d = 0; d < D; ++d) o[r * D + d] = softplus(x[r * D + d] + b[d]);
  });
  return out;
}

void dt_softplus_rows(const float* x, const float* bias, float* out, int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) out[r * D + d] = softplus(x[r * D + d] + bias[d]);
}

}  // namespace jambalab

namespace {

// d softplus(v) / dv = sigmoid(v): returns dout * sigmoid(dt + bias) (the bias grad is its sum).
at::Tensor dt_softplus_bwd(const at::Tensor& dt, const at::Tensor& bias, const at::Tensor& dout) {
  check_dt(dt, bias, "dt_softplus backward");
  TORCH_CHECK(dout.scalar_type() == at::kFloat && dout.is_contiguous() && dout.sizes() == dt.sizes(),
              "dt_softplus backward: dout must be contiguous float32 shaped as dt");
  auto grad = at::empty(dt.sizes(), dt.options());
  const int64_t D = bias.size(0), rows = D ? dt.numel() / D : 0;
  const float *x = dt.data_ptr<float>(), *b = bias.data_ptr<float>(), *g = dout.data_ptr<float>();
  float* o = grad.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, D)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t d = 0; d < D; ++d) o[r * D + d] = g[r * D + d] * sigmoid(x[r * D + d] + b[d]);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(jambalab_kernels, m) {
  m.def("dt_softplus_fwd(Tensor dt, Tensor bias) -> Tensor");
  m.def("dt_softplus_bwd(Tensor dt, Tensor bias, Tensor dout) -> Tensor");
  m.def("conv_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? conv_state) -> Tensor");
  m.def(
      "conv_bwd(Tensor x, Tensor weight, Tensor? bias, Tensor? conv_state, Tensor dout) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(jambalab_kernels, CPU, m) {
  m.impl("conv_fwd", &conv_fwd);
  m.impl("conv_bwd", &conv_bwd);
  m.impl("dt_softplus_fwd", &jambalab::dt_softplus_fwd);
  m.impl("dt_softplus_bwd", &dt_softplus_bwd);
}
