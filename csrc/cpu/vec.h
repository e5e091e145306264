// Small vectorised helpers shared by the CPU kernels.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#ifndef CPU_CAPABILITY
#error "the CPU kernels are compiled once per instruction set, named by CPU_CAPABILITY (csrc/isa.h)"
#endif

// Each instruction set's copy has its own symbols (csrc/isa.h), as ATen's at::vec does.
namespace mmkernels::cpu::inline CPU_CAPABILITY {

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

// x = exp(x - shift) in place, returning the sum: one pass over the tile.
// exp_u20 is the fast vectorised exp (about 20 ulp) that PyTorch's own CPU flash attention uses.
template <typename acc_t>
acc_t exp_and_sum(acc_t* x, int64_t n, acc_t shift) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec sum(0);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec e = (Vec::loadu(x + j) - Vec(shift)).exp_u20();
    e.store(x + j);
    sum = sum + e;
  }
  acc_t total = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, sum);
  for (; j < n; ++j) total += (x[j] = std::exp(x[j] - shift));
  return total;
}

// One row of a (rows, D) operand in the accumulation type: the row itself for fp32/fp64, a
// converted copy in a per-thread buffer for fp16/bf16.
template <typename scalar_t, typename acc_t>
const acc_t* load_row(const at::Tensor& t, int64_t r, acc_t* buf) {
  const scalar_t* src = t.const_data_ptr<scalar_t>() + r * t.stride(0);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t i = 0; i < t.size(1); ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf;
  }
}

template <typename scalar_t, typename acc_t>
void store_row(const acc_t* src, const at::Tensor& t, int64_t r, int64_t col0, int64_t n) {
  scalar_t* dst = t.data_ptr<scalar_t>() + r * t.stride(0) + col0;
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

}  // namespace mmkernels::cpu::inline CPU_CAPABILITY
