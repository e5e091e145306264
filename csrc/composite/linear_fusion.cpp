// Linear fusion, device-generic (an ATen composite, so not in cpu/): act(sum_m features_m @ weights_m^T + bias) as one accumulation
// of GEMMs over the virtual concatenation (never built), bias in the accumulator, activation
// applied once. The backward never builds the concatenation either. Registered for CPU; the same
// code serves CUDA tensors through cuBLAS until a fused epilogue kernel exists.
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../common.h"
#include "../limits.h"

namespace mmkernels {
namespace {

using namespace limits;  // Activation: the order of mmkernels/limits.py ACTIVATIONS

at::Tensor activate(const at::Tensor& pre, int64_t activation) {
  switch (activation) {
    case kActivationNone: return pre;
    case kActivationRelu: return at::relu(pre);
    case kActivationGelu: return at::gelu(pre);
    case kActivationSilu: return at::silu(pre);
    case kActivationTanh: return at::tanh(pre);
    case kActivationSigmoid: return at::sigmoid(pre);
  }
  TORCH_CHECK(false, "linear_fusion: activation index must be in [0, ", kActivations - 1, "], got ", activation);
}

at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& pre, int64_t activation) {
  switch (activation) {
    case kActivationNone: return grad;
    case kActivationRelu: return grad * (pre > 0);
    case kActivationGelu: return at::gelu_backward(grad, pre);
    case kActivationSilu: return at::silu_backward(grad, pre);
    case kActivationTanh: return at::tanh_backward(grad, at::tanh(pre));
    case kActivationSigmoid: return at::sigmoid_backward(grad, at::sigmoid(pre));
  }
  TORCH_CHECK(false, "linear_fusion: activation index must be in [0, ", kActivations - 1, "], got ", activation);
}

std::tuple<at::Tensor, at::Tensor> linear_fusion_native(at::TensorList features, at::TensorList weights,
                                                        const c10::optional<at::Tensor>& bias, int64_t activation) {
  checks::linear(features, weights, bias, activation, kActivations);
  const int64_t rows = features[0].size(0), out_dim = weights[0].size(0);
  // A fresh buffer, never the bias itself: expand(...).contiguous() returns the bias when there
  // is one row, and addmm_ would then write into the caller's parameter.
  at::Tensor pre = at::empty({rows, out_dim}, features[0].options());
  if (bias.has_value()) {
    pre.copy_(bias->expand({rows, out_dim}));
  } else {
    pre.zero_();
  }
  for (size_t m = 0; m < features.size(); ++m) pre.addmm_(features[m], weights[m].t());
  // Without an activation the output is the pre-activation; the backward does not need it.
  if (activation == kActivationNone) return {pre, at::empty({0}, pre.options())};
  return {activate(pre, activation), pre};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> linear_fusion_backward_native(
    const at::Tensor& grad_out, at::TensorList features, at::TensorList weights, const at::Tensor& pre,
    int64_t activation) {
  checks::linear(features, weights, c10::nullopt, activation, kActivations);
  const int64_t rows = features[0].size(0), out_dim = weights[0].size(0);
  checks::rows_like(grad_out, "grad_out", features[0], "features[0]", rows);
  TORCH_CHECK(grad_out.size(1) == out_dim, "grad_out must have width N = ", out_dim, ", got ", grad_out.size(1));
  if (activation != kActivationNone) checks::exact(pre, "pre", {rows, out_dim}, features[0], features[0].scalar_type());
  const at::Tensor g = activation_backward(grad_out, pre, activation);
  std::vector<at::Tensor> grad_features, grad_weights;
  for (size_t m = 0; m < features.size(); ++m) {
    grad_features.push_back(at::mm(g, weights[m]));
    grad_weights.push_back(at::mm(g.t(), features[m]));
  }
  return {grad_features, grad_weights, g.sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("native_linear_fusion", &linear_fusion_native);
  m.impl("native_linear_fusion_backward", &linear_fusion_backward_native);
}

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  m.impl("native_linear_fusion", &linear_fusion_native);
  m.impl("native_linear_fusion_backward", &linear_fusion_backward_native);
}

}  // namespace mmkernels
