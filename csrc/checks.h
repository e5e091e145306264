// What every raw operator checks before it indexes anything. torch.ops.mmkernels.native_* are
// reachable by anyone: a malformed call must raise (RuntimeError, a message that names the
// argument, what was expected and what came), never read out of bounds or crash, whatever the
// Python layer already checked. Shared by the CPU and CUDA kernels of each op.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "common.h"

namespace mmkernels::checks {

inline std::string describe(const at::Tensor& t) {
  return c10::str(t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
}

// A float (rows, width) tensor with ref's dtype and device and a unit column stride.
inline void rows_like(const at::Tensor& t, const std::string& name, const at::Tensor& ref, const std::string& ref_name,
                      int64_t rows) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.scalar_type() == ref.scalar_type() && t.device() == ref.device(),
              name, " must be (", rows, ", width) with ", ref_name, "'s dtype and device (", ref.scalar_type(), " on ",
              ref.device(), "), got ", describe(t));
  TORCH_CHECK(t.numel() == 0 || t.size(1) <= 1 || t.stride(1) == 1, name, " must have a contiguous last dim, got strides ",
              t.strides());
}

inline void float_rows(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK(t.dim() == 2 && at::isFloatingType(t.scalar_type()), name, " must be a 2-D float tensor, got ", describe(t));
  TORCH_CHECK(t.numel() == 0 || t.size(1) <= 1 || t.stride(1) == 1, name, " must have a contiguous last dim, got strides ",
              t.strides());
}

// A non-empty list of (rows, D_m) float tensors with the first one's dtype, device and rows.
inline void row_list(at::TensorList ts, const char* name) {
  TORCH_CHECK(!ts.empty(), name, " must be a non-empty list of tensors, got an empty list");
  float_rows(ts[0], c10::str(name, "[0]"));
  for (size_t m = 1; m < ts.size(); ++m) rows_like(ts[m], c10::str(name, "[", m, "]"), ts[0], c10::str(name, "[0]"), ts[0].size(0));
}

inline void exact(const at::Tensor& t, const std::string& name, at::IntArrayRef sizes, const at::Tensor& ref,
                  at::ScalarType dtype) {
  TORCH_CHECK(t.sizes() == sizes && t.scalar_type() == dtype && t.device() == ref.device(), name, " must be ", dtype,
              " of shape ", sizes, " on ", ref.device(), ", got ", describe(t));
}

inline void optional_vector(const c10::optional<at::Tensor>& t, const char* name, int64_t n, const at::Tensor& ref) {
  if (t.has_value()) exact(*t, name, {n}, ref, ref.scalar_type());
}

inline int64_t total_width(at::TensorList ts) {
  int64_t w = 0;
  for (const auto& t : ts) w += t.size(1);
  return w;
}

// concat_weighted_fusion: features, weight (M, sum D_m), bias (M,), values (none or M of them).
inline void fusion(at::TensorList features, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   at::TensorList values, bool concat) {
  row_list(features, "features");
  const int64_t M = static_cast<int64_t>(features.size()), rows = features[0].size(0);
  exact(weight, "weight", {M, total_width(features)}, features[0], features[0].scalar_type());
  optional_vector(bias, "bias", M, features[0]);
  TORCH_CHECK(values.empty() || static_cast<int64_t>(values.size()) == M, "values must be empty or hold one tensor per "
              "feature (", M, "), got ", values.size());
  for (size_t m = 0; m < values.size(); ++m) rows_like(values[m], c10::str("values[", m, "]"), features[0], "features[0]", rows);
  const auto& vals = values.empty() ? features : values;
  for (const auto& v : vals) {
    TORCH_CHECK(concat || v.size(1) == vals[0].size(1), "output='sum' needs every value of the same width, got ",
                v.size(1), " and ", vals[0].size(1));
  }
}

inline int64_t fusion_width(at::TensorList features, at::TensorList values, bool concat) {
  const auto& vals = values.empty() ? features : values;
  return concat ? total_width(vals) : vals[0].size(1);
}

inline void fusion_backward(const at::Tensor& grad_out, at::TensorList features, const at::Tensor& weight,
                            at::TensorList values, const at::Tensor& gate, bool concat) {
  fusion(features, weight, c10::nullopt, values, concat);
  const int64_t rows = features[0].size(0), M = static_cast<int64_t>(features.size());
  rows_like(grad_out, "grad_out", features[0], "features[0]", rows);
  TORCH_CHECK(grad_out.size(1) == fusion_width(features, values, concat), "grad_out must have the output's width ",
              fusion_width(features, values, concat), ", got ", grad_out.size(1));
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == rows && gate.size(1) == M && at::isFloatingType(gate.scalar_type()) &&
                  gate.device() == features[0].device(),
              "gate must be the forward's (", rows, ", ", M, ") float modality weights on ", features[0].device(),
              ", got ", describe(gate));
}

// decision_fusion: M (rows, C) logits and M normalised weights in the accumulation dtype.
inline void decision(at::TensorList logits, const at::Tensor& weights) {
  row_list(logits, "logits");
  const int64_t M = static_cast<int64_t>(logits.size());
  for (size_t m = 1; m < logits.size(); ++m) {
    TORCH_CHECK(logits[m].size(1) == logits[0].size(1), "logits[", m, "] must have logits[0]'s width ",
                logits[0].size(1), ", got ", logits[m].size(1));
  }
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == M && at::isFloatingType(weights.scalar_type()) &&
                  weights.device() == logits[0].device(),
              "weights must be a float (", M, ",) tensor on ", logits[0].device(), ", got ", describe(weights));
}

inline void decision_backward(const at::Tensor& grad_out, at::TensorList logits, const at::Tensor& weights) {
  decision(logits, weights);
  rows_like(grad_out, "grad_out", logits[0], "logits[0]", logits[0].size(0));
  TORCH_CHECK(grad_out.size(1) == logits[0].size(1), "grad_out must have the logits' width ", logits[0].size(1), ", got ",
              grad_out.size(1));
}

// linear_fusion: M (rows, D_m) features, M (N, D_m) weights, bias (N,), an activation index.
inline void linear(at::TensorList features, at::TensorList weights, const c10::optional<at::Tensor>& bias,
                   int64_t activation, int64_t activations) {
  row_list(features, "features");
  TORCH_CHECK(weights.size() == features.size(), "weights must hold one tensor per feature (", features.size(), "), got ",
              weights.size());
  const int64_t N = weights[0].dim() == 2 ? weights[0].size(0) : -1;
  for (size_t m = 0; m < weights.size(); ++m) {
    exact(weights[m], c10::str("weights[", m, "]"), {N, features[m].size(1)}, features[0], features[0].scalar_type());
  }
  optional_vector(bias, "bias", N, features[0]);
  TORCH_CHECK(activation >= 0 && activation < activations, "activation must be an index in [0, ", activations, "), got ",
              activation);
}

// gated_fusion: x_a (rows, Da), x_b (rows, Db); weights (N, Da), (N, Db), (N, Da + Db); biases (N,).
inline void gated(const at::Tensor& x_a, const at::Tensor& x_b, const at::Tensor& weight_a, const at::Tensor& weight_b,
                  const at::Tensor& weight_z) {
  float_rows(x_a, "x_a");
  rows_like(x_b, "x_b", x_a, "x_a", x_a.size(0));
  const int64_t N = weight_a.dim() == 2 ? weight_a.size(0) : -1, Da = x_a.size(1), Db = x_b.size(1);
  exact(weight_a, "weight_a", {N, Da}, x_a, x_a.scalar_type());
  exact(weight_b, "weight_b", {N, Db}, x_a, x_a.scalar_type());
  exact(weight_z, "weight_z", {N, Da + Db}, x_a, x_a.scalar_type());
}

// gated_residual_linear: x (rows, N), h (rows, K), weight (N, K), bias (N,), gate (1,), row_mask (rows,).
inline void gated_residual(const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight,
                           const at::Tensor& gate, const c10::optional<at::Tensor>& row_mask) {
  float_rows(x, "x");
  rows_like(h, "h", x, "x", x.size(0));
  exact(weight, "weight", {x.size(1), h.size(1)}, x, x.scalar_type());
  exact(gate, "gate", {1}, x, x.scalar_type());
  if (row_mask.has_value()) exact(*row_mask, "row_mask", {x.size(0)}, x, x.scalar_type());
}

}  // namespace mmkernels::checks
