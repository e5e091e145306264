// Shared by every kernel: argument checks that name the argument, and the accumulation type.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <type_traits>

namespace mmkernels {

// fp32 accumulation for every input dtype except float64, which keeps its precision so that
// gradcheck can run against the CPU kernel.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The saved log-sum-exp of cross_attention: float64 for float32/float64 inputs (the backward
// recomputes the forward's probabilities from it to the last bit), float32 for half types.
inline at::ScalarType lse_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat ? at::kDouble : at::kFloat;
}

// An optional int32/int64 index tensor (lengths, ranges) of the given shape on ref's device.
inline void check_index(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& ref,
                        at::IntArrayRef sizes) {
  if (!t.has_value()) return;
  TORCH_CHECK((t->scalar_type() == at::kInt || t->scalar_type() == at::kLong) && t->device() == ref.device(), name,
              " must be int32 or int64 on q's device (", ref.device(), "), got ", t->scalar_type(), " on ", t->device());
  TORCH_CHECK(t->sizes() == sizes, name, " must have shape ", sizes, ", got ", t->sizes());
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name,
              " must have a contiguous last dim (stride 1), got strides ", t.strides());
}

// Lengths and ranges as contiguous int64. Their values are validated in Python where that is
// free; kernels clamp them anyway, so that a bad value can never read or write out of bounds.
inline at::Tensor index_as_int64(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return at::Tensor();
  return t->to(at::kLong).contiguous();
}

}  // namespace mmkernels
