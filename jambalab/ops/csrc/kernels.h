// The kernels' C++ entry points, for the ops that compose them in one call (decode.cpp).
// Each is also registered as its own op in torch.ops.jambalab_kernels by its source file.
//
// Legend: R rows (batch of one-token decodes), K in_features, N out_features / d_state,
// D d_inner, Kc d_conv.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/util/Half.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

namespace jambalab {

// gemv.cpp: y (R, N) = x (R, K) @ weight (N, K)^T + bias, R <= 16, x float32, weight float32 or bf16.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
// gemv.cpp: RMSNorm over the last dim (HF's op order), x and weight float32 or bf16.
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


// Raw-pointer pieces of the kernels above, for decode_step (step.cpp), which runs a whole decode
// token through them on its own threads. Each computes exactly what its op computes for the
// same rows, so the composition is bitwise the op-by-op result.

// gemv.cpp: outputs [lo, hi) of y (R, N) = x (R, K) @ w (N, K)^T + bias.
void gemv_outputs(const float* x, int64_t R, const float* w, const float* bias, float* y, int64_t K, int64_t N,
                  int64_t lo, int64_t hi);
// gemv.cpp: the gemv op over a bf16 weight (weight-only bf16) in two parts: Bf16Rows rounds x (R, K) to
// bf16 once (as the op does); outputs() then computes outputs [lo, hi) of y (R, N) = x @ W^T + bias for
// any bf16 W (N, K) (its raw 16-bit values), exactly as the op computes them.
class Bf16Rows {
 public:
  Bf16Rows(const float* x, int64_t R, int64_t K);
  Bf16Rows(const uint16_t* x, int64_t R, int64_t K);  // x already bf16 (raw bits): taken as is
  void outputs(const uint16_t* w, const float* bias, float* y, int64_t N, int64_t lo, int64_t hi) const;

 private:
  int64_t R_, K_;
  std::vector<uint16_t> x_;  // the prepared x (bf16 bits, or fp32 in the layout of the kernel without AVX512-BF16)
};
// qgemv.cpp: wgemv over bf16 x and a bf16 weight (a bf16 model) in two parts: Bf16Dot takes x (R, K) (raw
// bf16 bits, R <= kBf16DotRows) once; outputs() then computes outputs [lo, hi) of the fp32 sums y (R, N)
// (wgemv then rounds them to bf16), exactly as wgemv computes them (a row's sums do not depend on R). Where
// the CPU has AVX512-BF16 (bf16dot_native()) vdpbf16ps multiplies x and the weights as they are; elsewhere
// x is widened once (exactly) and gemv.cpp's weight-only bf16 kernel widens the weights in registers
// (Bf16Rows): the same exact products, summed in fp32 in another order.
constexpr int kBf16DotRows = 16;
bool bf16dot_native();
class Bf16Dot {
 public:
  Bf16Dot(const uint16_t* x, int64_t R, int64_t K);
  void outputs(const uint16_t* w, const float* bias, float* y, int64_t N, int64_t lo, int64_t hi) const;

 private:
  const uint16_t* x_;
  int64_t R_, K_;
  std::optional<Bf16Rows> widened_;  // without AVX512-BF16
};
// gemv.cpp: RMSNorm of `rows` rows of K floats (w may be null: weightless).
void rms_norm_rows(const float* x, const float* w, float* y, int64_t rows, int64_t K, float eps);
// gemv.cpp: the same over bf16 x and weight (w may be null) to bf16 y, and over float32 x with a bf16
// weight to float32 y, as the rms_norm op computes them (x, w, y: raw bf16 bits).
void rms_norm_rows_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t rows, int64_t K, float eps);
void rms_norm_rows_f32_bf16w(const float* x, const uint16_t* w, float* y, int64_t rows, int64_t K, float eps);
// causal_conv1d.cpp: out (rows, D) = softplus(x + bias).
void dt_softplus_rows(const float* x, const float* bias, float* out, int64_t rows, int64_t D);
// selective_scan.cpp: state_update / conv_update split their R * D rows into update_parts() parts
// (the epilogue's vector/scalar split depends on them); part i of that split.
int update_parts(int64_t rows, int64_t work_per_row);
void state_update_part(int part, int parts, float* h, const float* x, const float* dt, const float* A,
                       const float* B, const float* C, const float* D, const float* z, float* y, int64_t R,
                       int64_t Dn, int64_t N);
void conv_update_part(int part, int parts, const float* x, float* conv_state, const float* w, const float* bias,
                      float* out, int64_t R, int64_t Dn, int64_t K);
// The same over bf16 activations (a bf16 model: x, dt, B, C, z, y and the conv state bf16, raw bits;
// the SSM state, A, D and the conv weights float32).
void state_update_part_bf16(int part, int parts, float* h, const uint16_t* x, const uint16_t* dt, const float* A,
                            const uint16_t* B, const uint16_t* C, const float* D, const uint16_t* z, uint16_t* y,
                            int64_t R, int64_t Dn, int64_t N);
void conv_update_part_bf16(int part, int parts, const uint16_t* x, uint16_t* conv_state, const float* w,
                           const float* bias, uint16_t* out, int64_t R, int64_t Dn, int64_t K);

// a8gemv.cpp: wgemv_a8 in two parts, for decode_step. A8Rows quantizes up to 4 rows of x (R, K) once
// (as wgemv_a8 does, for int8 or for 4-bit weights: the step layouts differ); outputs() then computes
// outputs [lo, hi) of y (R, N) = x @ W^T + bias for any W of that kind and in_features K, exactly as
// wgemv_a8 computes them (so gate and up, or q, k and v, share one quantization).
class A8Rows {
 public:
  A8Rows(const float* x, int64_t R, int64_t K, bool int4);
  ~A8Rows();
  A8Rows(A8Rows&&) noexcept;
  A8Rows& operator=(A8Rows&&) noexcept;
  int64_t rows() const;
  bool int4() const;
  // W int8 (N, K) or 4-bit (N, K / 2) bytes; scales fp16 (N, K / G); bias (N,) or null; y (R, N).
  void outputs(const void* w, const c10::Half* scales, int64_t G, const float* bias, float* y, int64_t N,
               int64_t lo, int64_t hi) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// step_bf16.cpp: decode_step (step.cpp) for a bf16 model, whose embedding is bf16.
at::Tensor decode_step_bf16(const at::Tensor& ids, at::TensorList weights, at::TensorList states, at::IntArrayRef meta,
                            at::IntArrayRef past, at::ArrayRef<double> eps);

// attention.cpp: decode attention as prepare, tasks() independent run(t), merge (the op runs the
// tasks on torch's threads, decode_step on its own).
struct KvView {  // a (B, Hk, S, hd) tensor whose rows of hd floats are contiguous
  const float* p;
  int64_t sb, sh, ss;  // strides of b, head and key, in floats
};
struct DecodeAttention {
  int64_t B = 0, H = 0, Hk = 0, S = 0, hd = 0;
  KvView k{}, v{};
  std::vector<float> qs, m, l, acc;  // scaled queries; per task and query: max, sum, output
  int64_t splits() const;
  int64_t tasks() const;
  void prepare(const float* q);  // q (B, H, hd)
  void run(int64_t t);
  void merge(float* out) const;  // out (B, H, hd)
};

}  // namespace jambalab
