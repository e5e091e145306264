// Small vectorised helpers shared by the CPU kernels.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace mmkernels::cpu {

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  return at::vec::map2_reduce_all<T>([](Vec x, Vec y) { return x * y; },
                                     [](Vec x, Vec y) { return x + y; }, a, b, n);
}

template <typename T>
void axpy(T alpha, const T* x, T* y, int64_t n) {  // y += alpha * x
  using Vec = at::vec::Vectorized<T>;
  at::vec::map2([alpha](Vec a, Vec b) { return b + Vec(alpha) * a; }, y, x, y, n);
}

}  // namespace mmkernels::cpu
