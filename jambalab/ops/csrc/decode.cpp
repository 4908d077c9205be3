// One decode token through a whole Mamba mixer, SwiGLU MLP or MoE layer in a single op call.
//
// Legend: R rows (a batch of one-token decodes, R <= 16), d d_model, D d_inner, N d_state,
// Rk dt_rank, E experts, F d_ff, k top_k.
//
// Why: a decode token of bench-hybrid (d_model 256) is ~75 GEMVs and ~600 small torch ops; at
// this width the per-op cost (Python, dispatcher, allocation) was about half of the step. These
// ops run the same kernels in the same order as the layer-by-layer path in jambalab/model.py (its
// reference twin, through jambalab.ops), so the results are bitwise the same; only the calls
// between the kernels are gone. Float32 and CPU only; the Python wrappers (jambalab/ops/fused.py)
// send anything else down the layer-by-layer path.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace {

using OptT = std::optional<at::Tensor>;

// Column block [start, start + width) of a (R, *) matrix as a contiguous (R, width) tensor (a view when R == 1).
at::Tensor cols(const at::Tensor& t, int64_t start, int64_t width) {
  return t.narrow(1, start, width).contiguous();
}

void check_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), op,
              ": x must be contiguous float32 (R, d), got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 16, op, ": 1 to 16 rows, got ", x.size(0));
}

// silu(gate) * up, in place in gate (model.swiglu without autograd).
at::Tensor swiglu_(at::Tensor gate, const at::Tensor& up) {
  at::silu_(gate);
  return gate.mul_(up);
}

// down(silu(gate(x)) * up(x)) for one expert's (F, d), (F, d), (d, F) weights.
at::Tensor swiglu_mlp(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down) {
  return jambalab::gemv(swiglu_(jambalab::gemv(x, w_gate, std::nullopt), jambalab::gemv(x, w_up, std::nullopt)),
                        w_down, std::nullopt);
}

// MambaMixer._step after in_proj (model.py): x (R, d) -> (R, d); conv_state, ssm_state updated in place.
at::Tensor mamba_decode(const at::Tensor& x, const at::Tensor& in_w, const OptT& in_b, at::Tensor& conv_state,
                        const at::Tensor& conv_w, const OptT& conv_b, const at::Tensor& x_proj_w, bool inner_norm,
                        const OptT& dt_norm_w, const OptT& b_norm_w, const OptT& c_norm_w, double norm_eps,
                        const at::Tensor& dt_proj_w, const at::Tensor& dt_proj_b, const at::Tensor& A,
                        const at::Tensor& D, at::Tensor& ssm_state, const at::Tensor& out_w, const OptT& out_b) {
  check_rows(x, "mamba_decode");
  TORCH_CHECK(ssm_state.dim() == 3 && ssm_state.size(0) == x.size(0), "mamba_decode: ssm_state must be (R, D, N), got ",
              ssm_state.sizes(), " for x ", x.sizes());
  TORCH_CHECK(dt_proj_w.dim() == 2, "mamba_decode: dt_proj weight must be (D, dt_rank)");
  const int64_t Dn = ssm_state.size(1), N = ssm_state.size(2), Rk = dt_proj_w.size(1);
  TORCH_CHECK(in_w.dim() == 2 && in_w.size(0) == 2 * Dn, "mamba_decode: in_proj weight must be (2 * ", Dn,
              ", d), got ", in_w.sizes());
  TORCH_CHECK(x_proj_w.dim() == 2 && x_proj_w.size(0) == Rk + 2 * N, "mamba_decode: x_proj weight must be (",
              Rk + 2 * N, ", ", Dn, "), got ", x_proj_w.sizes());
  const at::Tensor xz = jambalab::gemv(x, in_w, in_b);                                  // (R, 2D)
  const at::Tensor xc = jambalab::conv_update(cols(xz, 0, Dn), conv_state, conv_w, conv_b);  // (R, D)
  const at::Tensor dbc = jambalab::gemv(xc, x_proj_w, std::nullopt);                    // (R, Rk + 2N)
  at::Tensor dt = cols(dbc, 0, Rk), B = cols(dbc, Rk, N), C = cols(dbc, Rk + N, N);
  if (inner_norm) {
    dt = jambalab::rms_norm(dt, dt_norm_w, norm_eps);
    B = jambalab::rms_norm(B, b_norm_w, norm_eps);
    C = jambalab::rms_norm(C, c_norm_w, norm_eps);
  }
  dt = jambalab::dt_softplus_fwd(jambalab::gemv(dt, dt_proj_w, std::nullopt), dt_proj_b);  // (R, D)
  const at::Tensor y = jambalab::state_update(ssm_state, xc, dt, A, B, C, D, cols(xz, Dn, Dn));
  return jambalab::gemv(y, out_w, out_b);
}

// MLP.forward for R <= 16 rows.
at::Tensor mlp_decode(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down) {
  check_rows(x, "mlp_decode");
  return swiglu_mlp(x, w_gate, w_up, w_down);
}

// MoE.forward for R <= 16 rows: softmax router, top-k weights not renormalised; each row sums its
// k experts in ascending expert order (as MoE.dispatch's index_add_ over slots sorted by expert).
// Each expert runs once on all the rows routed to it (its weights read once a step); silu runs per
// row, so a row's output is what it would be alone. Returns (y (R, d), router_logits (R, E)).
std::tuple<at::Tensor, at::Tensor> moe_decode(const at::Tensor& x, const at::Tensor& router_w,
                                              const at::Tensor& w_gate, const at::Tensor& w_up,
                                              const at::Tensor& w_down, int64_t top_k) {
  check_rows(x, "moe_decode");
  TORCH_CHECK(w_gate.dim() == 3 && w_up.sizes() == w_gate.sizes() && w_down.dim() == 3 &&
                  w_down.size(0) == w_gate.size(0) && w_gate.is_contiguous() && w_up.is_contiguous() &&
                  w_down.is_contiguous(),
              "moe_decode: expert weights must be contiguous (E, F, d), (E, F, d), (E, d, F), got ", w_gate.sizes(),
              ", ", w_up.sizes(), ", ", w_down.sizes());
  TORCH_CHECK(top_k >= 1 && top_k <= w_gate.size(0), "moe_decode: top_k must be in 1..", w_gate.size(0), ", got ",
              top_k);
  const int64_t R = x.size(0), E = w_gate.size(0);
  const at::Tensor logits = jambalab::gemv(x, router_w, std::nullopt);  // (R, E)
  const auto [weights, experts] = at::topk(at::softmax(logits, -1, at::kFloat), top_k, -1);  // (R, k) each
  const auto ids = experts.accessor<int64_t, 2>();
  std::vector<at::Tensor> ye(R * top_k);  // row r's k-th choice, (1, d)
  for (int64_t e = 0; e < E; ++e) {
    std::vector<int64_t> slots;  // r * top_k + k of the choices of expert e
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < top_k; ++k)
        if (ids[r][k] == e) slots.push_back(r * top_k + k);
    if (slots.empty()) continue;
    std::vector<int64_t> rows(slots.size());
    for (size_t i = 0; i < slots.size(); ++i) rows[i] = slots[i] / top_k;
    const at::Tensor xe = x.index_select(0, at::tensor(rows, at::kLong));  // (n, d)
    at::Tensor gate = jambalab::gemv(xe, w_gate.select(0, e), std::nullopt);
    const at::Tensor up = jambalab::gemv(xe, w_up.select(0, e), std::nullopt);
    for (size_t i = 0; i < slots.size(); ++i) swiglu_(gate.narrow(0, i, 1), up.narrow(0, i, 1));
    const at::Tensor out = jambalab::gemv(gate, w_down.select(0, e), std::nullopt);  // (n, d)
    for (size_t i = 0; i < slots.size(); ++i) ye[slots[i]] = out.narrow(0, i, 1);
  }
  std::vector<at::Tensor> rows;
  for (int64_t r = 0; r < R; ++r) {
    std::vector<int64_t> order(top_k);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[r][a] < ids[r][b]; });
    at::Tensor out;
    for (const int64_t k : order) {
      const at::Tensor y = ye[r * top_k + k].mul(weights.select(0, r).select(0, k));
      out = out.defined() ? out.add(y) : y;
    }
    rows.push_back(out);
  }
  return {R == 1 ? rows[0] : at::cat(rows), logits};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(jambalab_kernels, m) {
  m.def(
      "mamba_decode(Tensor x, Tensor in_w, Tensor? in_b, Tensor(a!) conv_state, Tensor conv_w, Tensor? conv_b, "
      "Tensor x_proj_w, bool inner_norm, Tensor? dt_norm_w, Tensor? b_norm_w, Tensor? c_norm_w, float norm_eps, "
      "Tensor dt_proj_w, Tensor dt_proj_b, Tensor A, Tensor D, Tensor(b!) ssm_state, Tensor out_w, Tensor? out_b) "
      "-> Tensor");
  m.def("mlp_decode(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down) -> Tensor");
  m.def("moe_decode(Tensor x, Tensor router_w, Tensor w_gate, Tensor w_up, Tensor w_down, int top_k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(jambalab_kernels, CPU, m) {
  m.impl("mamba_decode", &mamba_decode);
  m.impl("mlp_decode", &mlp_decode);
  m.impl("moe_decode", &moe_decode);
}
