// The gated cross-attention output projection with its epilogue, device-generic (CPU, and CUDA
// through cuBLAS): out = x + tanh(gate) * row_mask * (h @ weight^T + bias). The Triton backend
// fuses the epilogue into the GEMM; here it is one GEMM and one elementwise pass.
#include <torch/library.h>

#include "../checks.h"
#include "../common.h"

namespace mmkernels {
namespace {

// tanh(gate) * row_mask as a (rows, 1) column, or the (1,) tanh(gate) when no row is masked.
at::Tensor row_scale(const at::Tensor& gate, const c10::optional<at::Tensor>& row_mask, const at::Tensor& like) {
  at::Tensor s = gate.tanh().to(like.scalar_type());
  return row_mask.has_value() ? (row_mask->to(like.scalar_type()) * s).unsqueeze(1) : s;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_linear_native(const at::Tensor& x, const at::Tensor& h,
                                                                const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                                                const at::Tensor& gate, const c10::optional<at::Tensor>& row_mask) {
  checks::gated_residual(x, h, weight, gate, row_mask);
  checks::optional_vector(bias, "bias", x.size(1), x);
  at::Tensor proj = bias.has_value() ? at::addmm(*bias, h, weight.t()) : at::mm(h, weight.t());
  return {at::addcmul(x, proj, row_scale(gate, row_mask, proj)), proj};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_residual_linear_backward_native(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& gate,
    const c10::optional<at::Tensor>& row_mask, const at::Tensor& proj) {
  checks::gated_residual(grad_out, h, weight, gate, row_mask);
  checks::exact(proj, "proj", grad_out.sizes(), grad_out, grad_out.scalar_type());
  const at::Tensor g_proj = grad_out * row_scale(gate, row_mask, grad_out);
  at::Tensor masked = row_mask.has_value() ? grad_out * row_mask->to(grad_out.scalar_type()).unsqueeze(1) : grad_out;
  // d/dgate of tanh(gate) * <masked grad, proj>, accumulated in fp32 (fp64 for fp64 inputs)
  const at::ScalarType acc = acc_dtype(grad_out.scalar_type());
  at::Tensor grad_gate = ((1 - gate.to(acc).tanh().square()) * (masked.to(acc) * proj.to(acc)).sum()).to(gate.scalar_type());
  return {grad_out.clone(), at::mm(g_proj, weight), at::mm(g_proj.t(), h), g_proj.sum(0), grad_gate};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("native_gated_residual_linear", &gated_residual_linear_native);
  m.impl("native_gated_residual_linear_backward", &gated_residual_linear_backward_native);
}

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  m.impl("native_gated_residual_linear", &gated_residual_linear_native);
  m.impl("native_gated_residual_linear_backward", &gated_residual_linear_backward_native);
}

}  // namespace mmkernels
