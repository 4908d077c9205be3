// Cross-entropy over the vocabulary, the training loss, forward and backward (twin:
// F.cross_entropy with reduction="mean" and an ignore_index; jambalab/ops/fused.py).
//
// Legend: T rows (tokens), V vocabulary (classes).
//
// Why: at 1 x 512 tokens x 65536 classes torch's CPU log_softmax and its backward spend ~0.2 s
// and ~0.6 s of a ~3.5 s single-thread training step of bench-hybrid, in scalar exp calls, and
// nll_loss's backward zero-fills a (T, V) gradient first. Here a row is three vectorised passes
// forward (max, sum of 2^((x - max) log2 e), then lse) and one backward, which writes
// scale * (softmax - onehot) straight into a fresh gradient.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "simd.h"  // W, vf, load, hsum, exp2_fast

namespace {

constexpr float kLog2e = 1.4426950408889634f;

float row_max(const float* x, int64_t V) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  if (V >= W) {
    vf mv = load(x);
    for (j = W; j + W <= V; j += W) {
      const vf v = load(x + j);
      mv = v > mv ? v : mv;
    }
    alignas(kVecBytes) float lanes[W];
    std::memcpy(lanes, &mv, sizeof mv);
    for (int l = 0; l < W; ++l) m = std::max(m, lanes[l]);
  }
  for (; j < V; ++j) m = std::max(m, x[j]);
  return m;
}

// log(sum_j exp(x_j)), by 2^((x_j - max) log2 e) written to tmp (a loop GCC vectorises) and summed.
float row_lse(const float* x, int64_t V, float* tmp) {
  const float m = row_max(x, V);
  if (!std::isfinite(m)) return m;  // all -inf (or a +inf / NaN): as log_softmax, no finite answer
  for (int64_t j = 0; j < V; ++j) tmp[j] = exp2_fast((x[j] - m) * kLog2e);
  vf a0{}, a1{};
  int64_t j = 0;
  for (; j + 2 * W <= V; j += 2 * W) {
    a0 += load(tmp + j);
    a1 += load(tmp + j + W);
  }
  float s = hsum(a0 + a1);
  for (; j < V; ++j) s += tmp[j];
  return m + std::log(s);
}

void check(const at::Tensor& logits, const at::Tensor& target, const char* op) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(), op,
              ": logits must be contiguous float32 (T, V), got ", logits.sizes(), " ", logits.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.scalar_type() == at::kLong && target.is_contiguous() &&
                  target.size(0) == logits.size(0),
              op, ": target must be contiguous int64 (", logits.size(0), ",), got ", target.sizes(), " ",
              target.scalar_type());
}

// Target t of row r, or -1 for an ignored row; an out-of-range class is an error, as in nll_loss.
int64_t target_of(const int64_t* target, int64_t r, int64_t V, int64_t ignore_index) {
  const int64_t t = target[r];
  if (t == ignore_index) return -1;
  TORCH_CHECK(t >= 0 && t < V, "cross_entropy: target ", t, " at row ", r, " is out of range for ", V, " classes");
  return t;
}

// (sum over kept rows of lse_r - x[r, t_r] as a float64 scalar, lse (T,), kept rows as int64 scalar)
std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                       int64_t ignore_index) {
  check(logits, target, "ce_fwd");
  const int64_t T = logits.size(0), V = logits.size(1);
  auto lse = at::empty({T}, logits.options());
  const float* x = logits.data_ptr<float>();
  const int64_t* tg = target.data_ptr<int64_t>();
  float* l = lse.data_ptr<float>();
  std::vector<double> part(T, 0.0);  // per-row terms, summed in row order below: the same total for any thread count
  std::vector<char> kept(T, 0);
  at::parallel_for(0, T, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> tmp(V);
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t t = target_of(tg, r, V, ignore_index);
      l[r] = row_lse(x + r * V, V, tmp.data());
      if (t >= 0) part[r] = static_cast<double>(l[r]) - x[r * V + t], kept[r] = 1;
    }
  });
  double total = 0.0;
  int64_t count = 0;
  for (int64_t r = 0; r < T; ++r) total += part[r], count += kept[r];
  return {at::scalar_tensor(total, logits.options().dtype(at::kDouble)),
          lse, at::scalar_tensor(count, logits.options().dtype(at::kLong))};
}

// d loss_sum * scale / d logits: scale * (softmax(x_r) - onehot(t_r)) on kept rows, 0 on ignored ones,
// written to grad (T, V), which may be logits itself (each element is read once, then written).
void ce_grad_into(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse, int64_t ignore_index,
                  double scale, at::Tensor& grad, const char* op) {
  check(logits, target, op);
  const int64_t T = logits.size(0), V = logits.size(1);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 1 && lse.size(0) == T, op,
              ": lse must be contiguous float32 (", T, ",)");
  const float* x = logits.data_ptr<float>();
  const int64_t* tg = target.data_ptr<int64_t>();
  const float* l = lse.data_ptr<float>();
  float* g = grad.data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, T, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t t = target_of(tg, r, V, ignore_index);
      float* gr = g + r * V;
      if (t < 0) {
        std::fill(gr, gr + V, 0.0f);
        continue;
      }
      const float* xr = x + r * V;
      const float lr = l[r];
      for (int64_t j = 0; j < V; ++j) gr[j] = s * exp2_fast((xr[j] - lr) * kLog2e);
      gr[t] -= s;
    }
  });
}

at::Tensor ce_bwd(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse, int64_t ignore_index,
                  double scale) {
  auto grad = at::empty(logits.sizes(), logits.options());
  ce_grad_into(logits, target, lse, ignore_index, scale, grad, "ce_bwd");
  return grad;
}

// The same gradient, overwriting the logits (a chunk of the fused lm_head + loss reuses one buffer).
at::Tensor ce_bwd_(at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse, int64_t ignore_index,
                   double scale) {
  ce_grad_into(logits, target, lse, ignore_index, scale, logits, "ce_bwd_");
  return logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(jambalab_kernels, m) {
  m.def("ce_fwd(Tensor logits, Tensor target, int ignore_index) -> (Tensor, Tensor, Tensor)");
  m.def("ce_bwd(Tensor logits, Tensor target, Tensor lse, int ignore_index, float scale) -> Tensor");
  m.def("ce_bwd_(Tensor(a!) logits, Tensor target, Tensor lse, int ignore_index, float scale) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(jambalab_kernels, CPU, m) {
  m.impl("ce_fwd", &ce_fwd);
  m.impl("ce_bwd", &ce_bwd);
  m.impl("ce_bwd_", &ce_bwd_);
}
