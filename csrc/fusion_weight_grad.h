// The weight/bias gradients of concat-weighted fusion, shared by the CPU and CUDA kernels:
// grad_weight[:, cols of m] = dlogits^T @ features_m, accumulated in fixed row chunks so the
// reduction order never depends on threads or launch shape, and reduced-precision features are
// widened one chunk at a time (never a full-size fp32 copy).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>

#include "limits.h"

namespace mmkernels {

inline std::tuple<at::Tensor, at::Tensor> fusion_weight_grad(const at::Tensor& dlogits,
                                                             at::TensorList features,
                                                             const at::Tensor& weight) {
  constexpr int64_t kChunk = limits::kWeightGradChunk;  // the triton backend sums in the same chunks
  const int64_t rows = dlogits.size(0);
  at::Tensor grad_weight = at::zeros({dlogits.size(1), weight.size(1)}, dlogits.options());
  int64_t off = 0;
  for (const auto& f : features) {
    at::Tensor gw = grad_weight.narrow(1, off, f.size(1));
    for (int64_t r0 = 0; r0 < rows; r0 += kChunk) {
      const int64_t n = std::min(kChunk, rows - r0);
      gw.addmm_(dlogits.narrow(0, r0, n).t(), f.narrow(0, r0, n).to(dlogits.scalar_type()));
    }
    off += f.size(1);
  }
  return {grad_weight.to(weight.scalar_type()), dlogits.sum(0).to(weight.scalar_type())};
}

}  // namespace mmkernels
