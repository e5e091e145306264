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

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name,
              " must have a contiguous last dim (stride 1), got strides ", t.strides());
}

// Lengths are validated in Python; kernels still clamp so that a bad value can never read or
// write out of bounds.
inline at::Tensor lengths_as_int64(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return at::Tensor();
  return t->to(at::kLong).contiguous();
}

}  // namespace mmkernels
