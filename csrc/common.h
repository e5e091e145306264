// Shared by every kernel: argument checks that name the argument, and the accumulation type.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mmkernels {

// fp32 accumulation for every input dtype except float64, which keeps its precision so that
// gradcheck can run against the CPU kernel.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The softmax statistics cross_attention saves for its backward (mmkernels.backends.base.
// stats_shape): for float32/float64 inputs the row max and log(row sum) apart, (B, Hq, Lq, 2)
// float64; for half inputs the log-sum-exp, (B, Hq, Lq) float32.
inline bool stats_pair(at::ScalarType t) { return t == at::kDouble || t == at::kFloat; }

inline std::vector<int64_t> stats_sizes(const at::Tensor& q) {
  std::vector<int64_t> s{q.size(0), q.size(1), q.size(2)};
  if (stats_pair(q.scalar_type())) s.push_back(2);
  return s;
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
  TORCH_CHECK(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
              " must have a contiguous last dim (stride 1), got strides ", t.strides());
}

// A fresh output tensor. On Linux CPUs a large one is advised into transparent huge pages before
// its first touch: a fused kernel that streams through its output otherwise spends most of its
// time in 4 KiB page faults (on our machines an allocating copy runs at a fifth of the speed of a
// copy into existing memory; with huge pages at two thirds). Only advice: the kernel may refuse.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = 2u << 20;
  const size_t bytes = t.nbytes();
  if (t.device().is_cpu() && bytes >= 2 * kHuge) {
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + bytes) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// Lengths and ranges as contiguous int64. Their values are validated in Python where that is
// free; kernels clamp them anyway, so that a bad value can never read or write out of bounds.
inline at::Tensor index_as_int64(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return at::Tensor();
  return t->to(at::kLong).contiguous();
}

}  // namespace mmkernels
