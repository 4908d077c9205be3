// The kernels' C++ entry points, for the ops that compose them in one call (decode.cpp).
// Each is also registered as its own op in torch.ops.jambalab_kernels by its source file.
//
// Legend: R rows (batch of one-token decodes), K in_features, N out_features / d_state,
// D d_inner, Kc d_conv.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace jambalab {

// gemv.cpp: y (R, N) = x (R, K) @ weight (N, K)^T + bias, R <= 4, float32.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
// gemv.cpp: RMSNorm over the last dim, float32 (HF's op order).
at::Tensor rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps);
// causal_conv1d.cpp: softplus(dt + bias), bias (D,) over the last dim, float32.
at::Tensor dt_softplus_fwd(const at::Tensor& dt, const at::Tensor& bias);
// selective_scan.cpp: one SSM step; h (R, D, N) fp32 updated in place; returns y (R, D).
at::Tensor state_update(at::Tensor& h, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                        const std::optional<at::Tensor>& z);
// selective_scan.cpp: one conv step; conv_state (R, D, Kc) shifted in place; returns silu(conv) (R, D).
at::Tensor conv_update(const at::Tensor& x, at::Tensor& conv_state, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias);

}  // namespace jambalab
