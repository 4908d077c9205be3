// Two ops of the decode path, beside their pure-PyTorch twins (jambalab/ops/fused.py):
// - gemv: y (R, N) = x (R, K) @ W (N, K)^T + bias for R <= 16 rows (twin: F.linear);
// - rms_norm: y = x * rsqrt(mean(x^2) + eps) * weight over the last dim, fp32 (twin:
//   jambalab.ops.rms_norm_ref, HF's op order). On CPU F.rms_norm is a chain of ~7 ops,
//   ~60 us for a 16-wide row; a decode token of bench-hybrid runs 38 norms.
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
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

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

}  // namespace

namespace jambalab {

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "gemv: float32 only");
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

}  // namespace jambalab

namespace {

// ---------------------------------------------------------------- rms_norm

void rms_row(const float* x, const float* w, float* y, int64_t K, float eps) {
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
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(K) + eps);
  if (w) {
    for (int64_t j = 0; j < K; ++j) y[j] = w[j] * (x[j] * inv);
  } else {
    for (int64_t j = 0; j < K; ++j) y[j] = x[j] * inv;
  }
}

}  // namespace

namespace jambalab {

void rms_norm_rows(const float* x, const float* w, float* y, int64_t rows, int64_t K, float eps) {
  for (int64_t r = 0; r < rows; ++r) rms_row(x + r * K, w, y + r * K, K, eps);
}

at::Tensor rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1, "rms_norm: x must be contiguous float32");
  const int64_t K = x.size(-1), rows = K ? x.numel() / K : 0;
  if (weight) {
    TORCH_CHECK(weight->scalar_type() == at::kFloat && weight->is_contiguous() && weight->numel() == K,
                "rms_norm: weight must be contiguous float32 (", K, ",)");
  }
  auto y = at::empty(x.sizes(), x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight ? weight->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) rms_row(xp + r * K, wp, yp + r * K, K, e);
  });
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
