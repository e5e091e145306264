// The gated multimodal unit, device-generic (CPU, and CUDA through cuBLAS):
//   h = z * tanh(x_a W_a^T + b_a) + (1 - z) * tanh(x_b W_b^T + b_b),  z = sigmoid([x_a; x_b] W_z^T + b_z)
// The gate's GEMM runs over the virtual concatenation [x_a; x_b] (two accumulated GEMMs on column
// slices of W_z), and the blend is one elementwise pass. The backward never builds the concat.
#include <torch/library.h>

#include "../checks.h"
#include "../common.h"

namespace mmkernels {
namespace {

at::Tensor affine(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  return b.has_value() ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_fusion_native(
    const at::Tensor& x_a, const at::Tensor& x_b, const at::Tensor& weight_a, const at::Tensor& weight_b,
    const at::Tensor& weight_z, const c10::optional<at::Tensor>& bias_a, const c10::optional<at::Tensor>& bias_b,
    const c10::optional<at::Tensor>& bias_z) {
  checks::gated(x_a, x_b, weight_a, weight_b, weight_z);
  checks::optional_vector(bias_a, "bias_a", weight_a.size(0), x_a);
  checks::optional_vector(bias_b, "bias_b", weight_a.size(0), x_a);
  checks::optional_vector(bias_z, "bias_z", weight_a.size(0), x_a);
  const int64_t da = x_a.size(1);
  at::Tensor h_a = affine(x_a, weight_a, bias_a).tanh_();
  at::Tensor h_b = affine(x_b, weight_b, bias_b).tanh_();
  at::Tensor z = affine(x_a, weight_z.narrow(1, 0, da), bias_z);
  z.addmm_(x_b, weight_z.narrow(1, da, x_b.size(1)).t()).sigmoid_();
  at::Tensor out = at::lerp(h_b, h_a, z);  // z * h_a + (1 - z) * h_b in one pass
  return {out, h_a, h_b, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_fusion_backward_native(const at::Tensor& grad_out, const at::Tensor& x_a, const at::Tensor& x_b,
                             const at::Tensor& weight_a, const at::Tensor& weight_b, const at::Tensor& weight_z,
                             const at::Tensor& h_a, const at::Tensor& h_b, const at::Tensor& z) {
  checks::gated(x_a, x_b, weight_a, weight_b, weight_z);
  const std::vector<int64_t> out_shape{x_a.size(0), weight_a.size(0)};
  for (const auto& [t, name] : {std::pair{&grad_out, "grad_out"}, {&h_a, "h_a"}, {&h_b, "h_b"}, {&z, "z"}}) {
    checks::exact(*t, name, out_shape, x_a, x_a.scalar_type());
  }
  const int64_t da = x_a.size(1), db = x_b.size(1);
  const at::Tensor g_a = grad_out * z * (1 - h_a * h_a);          // through tanh of branch a
  const at::Tensor g_b = grad_out * (1 - z) * (1 - h_b * h_b);    // through tanh of branch b
  const at::Tensor g_z = grad_out * (h_a - h_b) * z * (1 - z);    // through the sigmoid gate
  const at::Tensor wz_a = weight_z.narrow(1, 0, da), wz_b = weight_z.narrow(1, da, db);
  at::Tensor grad_x_a = at::mm(g_a, weight_a).addmm_(g_z, wz_a);
  at::Tensor grad_x_b = at::mm(g_b, weight_b).addmm_(g_z, wz_b);
  at::Tensor grad_weight_z = at::cat({at::mm(g_z.t(), x_a), at::mm(g_z.t(), x_b)}, 1);  // small: N x (Da + Db)
  return {grad_x_a, grad_x_b, at::mm(g_a.t(), x_a), at::mm(g_b.t(), x_b), grad_weight_z,
          g_a.sum(0), g_b.sum(0), g_z.sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("native_gated_fusion", &gated_fusion_native);
  m.impl("native_gated_fusion_backward", &gated_fusion_backward_native);
}

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  m.impl("native_gated_fusion", &gated_fusion_native);
  m.impl("native_gated_fusion_backward", &gated_fusion_backward_native);
}

}  // namespace mmkernels
