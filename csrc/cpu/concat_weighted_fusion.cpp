// CPU concat-weighted fusion. Features and values arrive as (rows, D_m) views with any row stride.
//
// Forward, per row: the M gate logits from every modality's slice of the weight (the
// concatenation is never built) as M independent FMA chains over the row, so the dot products
// are bound by loads rather than by one chain's latency; softmax over modalities; then the
// weighted sum (or weighted concat) of the values while the row is still in cache.
//
// Backward, per block of rows: per-row logit gradients and every feature/value gradient, then
// the block's share of the weight and bias gradients (dW[k, cols of m] += dl[r, k] f_m[r]) while
// its feature rows are still in cache, so the features are read once. Blocks sum into the
// partial of their fixed chunk of rows, and chunks are added in order: the gradients do not
// depend on the thread count or on which thread ran which block.
//
// Rows are handed out dynamically (parallel.h): a thread slowed down by another process takes
// fewer of them.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "../common.h"
#include "../isa.h"
#include "parallel.h"
#include "vec.h"

namespace mmkernels {
namespace {

using cpu::axpy;
using cpu::dot;
using cpu::load_row;
using cpu::store_row;

constexpr int64_t kRowGrain = 32;  // rows per forward task and per backward weight-gradient block

// The backward's tasks: chunks of rows, each with its own weight-gradient partial. Their size
// depends on the row count only (never on threads), so the partials and the order they are
// added in, and hence the gradients, do not depend on the thread count; at most 64 of them.
int64_t chunk_rows(int64_t rows) {
  const int64_t per = (rows + 63) / 64;
  return std::clamp<int64_t>((per + kRowGrain - 1) / kRowGrain * kRowGrain, kRowGrain, 4096);
}

struct Layout {
  int64_t M = 0, rows = 0, width = 0;  // width: sum D_m, the weight's columns
  std::vector<int64_t> d, d_off;       // feature widths and their column offsets in the weight
  std::vector<int64_t> e, e_off;       // value widths and their column offsets in a concat output
  int64_t max_d = 0, max_e = 0;
};

Layout make_layout(at::TensorList features, at::TensorList values) {
  Layout L;
  L.M = static_cast<int64_t>(features.size());
  L.rows = L.M ? features[0].size(0) : 0;
  int64_t off = 0, eoff = 0;
  for (int64_t m = 0; m < L.M; ++m) {
    const auto& val = values.empty() ? features[m] : values[m];
    L.d.push_back(features[m].size(1));
    L.d_off.push_back(off);
    L.e.push_back(val.size(1));
    L.e_off.push_back(eoff);
    off += L.d.back();
    eoff += L.e.back();
    L.max_d = std::max(L.max_d, L.d.back());
    L.max_e = std::max(L.max_e, L.e.back());
  }
  L.width = off;
  return L;
}

// acc[k] += sum_i x[i] * w[k * ldw + i] for k < M, i < n: M dot products over one row at once,
// each with two vector accumulators, so 2M FMA chains run side by side.
template <typename T, int M>
void dots_fixed(const T* x, const T* w, int64_t ldw, int64_t n, T* acc) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  V a0[M], a1[M];
  for (int k = 0; k < M; ++k) a0[k] = a1[k] = V(T(0));
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    // x streams from memory once; hardware prefetchers stop at page boundaries, so ask ahead.
    __builtin_prefetch(x + i + 512);
    const V x0 = V::loadu(x + i), x1 = V::loadu(x + i + W);
#pragma GCC unroll 8
    for (int k = 0; k < M; ++k) {
      a0[k] = at::vec::fmadd(x0, V::loadu(w + k * ldw + i), a0[k]);
      a1[k] = at::vec::fmadd(x1, V::loadu(w + k * ldw + i + W), a1[k]);
    }
  }
  for (; i + W <= n; i += W) {
    const V x0 = V::loadu(x + i);
    for (int k = 0; k < M; ++k) a0[k] = at::vec::fmadd(x0, V::loadu(w + k * ldw + i), a0[k]);
  }
  for (int k = 0; k < M; ++k) {
    T s = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, a0[k] + a1[k]);
    for (int64_t t = i; t < n; ++t) s += x[t] * w[k * ldw + t];
    acc[k] += s;
  }
}

template <typename T>
void dots(int64_t M, const T* x, const T* w, int64_t ldw, int64_t n, T* acc) {
  switch (M) {
    case 1: return dots_fixed<T, 1>(x, w, ldw, n, acc);
    case 2: return dots_fixed<T, 2>(x, w, ldw, n, acc);
    case 3: return dots_fixed<T, 3>(x, w, ldw, n, acc);
    case 4: return dots_fixed<T, 4>(x, w, ldw, n, acc);
    default:
      for (int64_t k0 = 0; k0 < M; k0 += 4) {  // four at a time
        const int64_t k = std::min<int64_t>(4, M - k0);
        if (k == 4) dots_fixed<T, 4>(x, w + k0 * ldw, ldw, n, acc + k0);
        else if (k == 3) dots_fixed<T, 3>(x, w + k0 * ldw, ldw, n, acc + k0);
        else if (k == 2) dots_fixed<T, 2>(x, w + k0 * ldw, ldw, n, acc + k0);
        else dots_fixed<T, 1>(x, w + k0 * ldw, ldw, n, acc + k0);
      }
  }
}

// g = softmax(g) over the M modalities of one row.
template <typename acc_t>
void softmax_modalities(acc_t* g, int64_t M) {
  const acc_t mx = *std::max_element(g, g + M);
  acc_t sum = 0;
  for (int64_t k = 0; k < M; ++k) sum += (g[k] = std::exp(g[k] - mx));
  for (int64_t k = 0; k < M; ++k) g[k] /= sum;
}

// Row r of each tensor in acc_t: the row itself for fp32/fp64, a widened copy in buf[m] else.
template <typename scalar_t, typename acc_t>
void load_rows(at::TensorList ts, int64_t r, std::vector<std::vector<acc_t>>& buf, std::vector<const acc_t*>& out) {
  for (size_t m = 0; m < ts.size(); ++m) out[m] = load_row<scalar_t, acc_t>(ts[m], r, buf[m].data());
}

std::tuple<at::Tensor, at::Tensor> concat_weighted_fusion_cpu(
    at::TensorList features, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::TensorList values, bool concat) {
  checks::fusion(features, weight, bias, values, concat);
  const Layout L = make_layout(features, values);
  const auto& vals = values.empty() ? features : values;
  const at::ScalarType acc = acc_dtype(features[0].scalar_type());
  const int64_t out_width = concat ? L.e_off.back() + L.e.back() : L.e[0];
  at::Tensor out = empty_output({L.rows, out_width}, features[0].options());
  at::Tensor gate = at::empty({L.rows, L.M}, features[0].options().dtype(acc));
  const at::Tensor w = weight.to(acc).contiguous();  // M x sum(D): small, read by every row
  const at::Tensor b = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "concat_weighted_fusion_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* bp = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
    struct Scratch {
      std::vector<std::vector<acc_t>> fbuf, vbuf;
      std::vector<const acc_t*> v;
      std::vector<acc_t> acc_row;
    };
    auto make = [&] {
      Scratch s;
      s.fbuf.assign(L.M, std::vector<acc_t>(L.max_d));
      s.vbuf.assign(L.M, std::vector<acc_t>(std::max(L.max_d, L.max_e)));
      s.v.resize(L.M);
      s.acc_row.resize(std::max(L.max_e, out_width));
      return s;
    };
    cpu::for_each_chunk(L.rows, kRowGrain, make, [&](int64_t begin, int64_t end, Scratch& S) {
      // Gate logits modality by modality, so that each feature tensor streams through in order
      // (its rows of this block are then in cache for the weighted sum).
      acc_t* g0 = gate.data_ptr<acc_t>() + begin * L.M;
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t k = 0; k < L.M; ++k) g0[(r - begin) * L.M + k] = bp ? bp[k] : acc_t(0);
      }
      for (int64_t m = 0; m < L.M; ++m) {
        for (int64_t r = begin; r < end; ++r) {
          const acc_t* f = load_row<scalar_t, acc_t>(features[m], r, S.fbuf[m].data());
          dots(L.M, f, wp + L.d_off[m], L.width, L.d[m], g0 + (r - begin) * L.M);
        }
      }
      for (int64_t r = begin; r < end; ++r) {
        acc_t* g = g0 + (r - begin) * L.M;
        softmax_modalities(g, L.M);
        load_rows<scalar_t, acc_t>(vals, r, S.vbuf, S.v);
        if (concat) {
          for (int64_t m = 0; m < L.M; ++m) {
            const acc_t gm = g[m];
            at::vec::map([gm](at::vec::Vectorized<acc_t> x) { return x * at::vec::Vectorized<acc_t>(gm); },
                         S.acc_row.data(), S.v[m], L.e[m]);
            store_row<scalar_t, acc_t>(S.acc_row.data(), out, r, L.e_off[m], L.e[m]);
          }
        } else {
          std::fill(S.acc_row.begin(), S.acc_row.begin() + out_width, acc_t(0));
          for (int64_t m = 0; m < L.M; ++m) axpy(g[m], S.v[m], S.acc_row.data(), L.e[m]);
          store_row<scalar_t, acc_t>(S.acc_row.data(), out, r, 0, out_width);
        }
      }
    });
  });
  return {out, gate};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, std::vector<at::Tensor>>
concat_weighted_fusion_backward_cpu(const at::Tensor& grad_out, at::TensorList features,
                                    const at::Tensor& weight, at::TensorList values,
                                    const at::Tensor& gate, bool concat) {
  checks::fusion_backward(grad_out, features, weight, values, gate, concat);
  const Layout L = make_layout(features, values);
  const bool separate_values = !values.empty();
  const at::ScalarType acc = acc_dtype(features[0].scalar_type());
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor g_all = gate.to(acc).contiguous();
  const int64_t chunk = chunk_rows(L.rows);
  const int64_t chunks = std::max<int64_t>(1, (L.rows + chunk - 1) / chunk);
  // Per chunk of rows: the weight gradient (M x width) and the bias gradient (M), summed in order below.
  at::Tensor partial_w = at::zeros({chunks, L.M, L.width}, w.options());
  at::Tensor partial_b = at::zeros({chunks, L.M}, w.options());

  std::vector<at::Tensor> grad_features, grad_values;
  for (const auto& f : features) grad_features.push_back(empty_output({L.rows, f.size(1)}, f.options()));
  if (separate_values) {
    for (const auto& v : values) grad_values.push_back(empty_output({L.rows, v.size(1)}, v.options()));
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "concat_weighted_fusion_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    using V = at::vec::Vectorized<acc_t>;
    const acc_t* wp = w.const_data_ptr<acc_t>();
    struct Scratch {
      std::vector<acc_t> fblock;  // the block's feature rows in acc_t, each `width` wide (the concat, one row at a time)
      std::vector<acc_t> dl;      // the block's logit gradients, rows x M
      std::vector<acc_t> dout, grad_row, dg;
      std::vector<std::vector<acc_t>> vbuf;
      std::vector<const acc_t*> v;
    };
    auto make = [&] {
      Scratch s;
      s.fblock.resize(kRowGrain * L.width);
      s.dl.resize(kRowGrain * L.M);
      s.dout.resize(concat ? L.e_off.back() + L.e.back() : L.e[0]);
      s.grad_row.resize(std::max(L.max_d, L.max_e));
      s.dg.resize(L.M);
      s.vbuf.assign(L.M, std::vector<acc_t>(L.max_e));
      s.v.resize(L.M);
      return s;
    };
    auto backward_block = [&](int64_t begin, int64_t end, Scratch& S, acc_t* pw, acc_t* pb) {
      for (int64_t r = begin; r < end; ++r) {
        acc_t* frow = S.fblock.data() + (r - begin) * L.width;
        for (int64_t m = 0; m < L.M; ++m) {
          const scalar_t* src = features[m].const_data_ptr<scalar_t>() + r * features[m].stride(0);
          for (int64_t i = 0; i < L.d[m]; ++i) frow[L.d_off[m] + i] = static_cast<acc_t>(src[i]);
        }
        const acc_t* g = g_all.const_data_ptr<acc_t>() + r * L.M;
        const acc_t* dout = load_row<scalar_t, acc_t>(grad_out, r, S.dout.data());
        auto dout_of = [&](int64_t m) { return concat ? dout + L.e_off[m] : dout; };
        if (separate_values) load_rows<scalar_t, acc_t>(values, r, S.vbuf, S.v);
        acc_t weighted = 0;
        for (int64_t m = 0; m < L.M; ++m) {
          const acc_t* val = separate_values ? S.v[m] : frow + L.d_off[m];
          S.dg[m] = dot(dout_of(m), val, L.e[m]);
          weighted += g[m] * S.dg[m];
        }
        acc_t* dl = S.dl.data() + (r - begin) * L.M;
        for (int64_t m = 0; m < L.M; ++m) dl[m] = g[m] * (S.dg[m] - weighted);
        for (int64_t m = 0; m < L.M; ++m) {
          // grad f_m = sum_k dl[k] W[k, cols of m] (+ g_m dout_m when the features are the values)
          acc_t* gr = S.grad_row.data();
          const int64_t n = L.d[m];
          int64_t i = 0;
          for (; i + V::size() <= n; i += V::size()) {
            V a = separate_values ? V(acc_t(0)) : V(g[m]) * V::loadu(dout_of(m) + i);
            for (int64_t k = 0; k < L.M; ++k) a = at::vec::fmadd(V(dl[k]), V::loadu(wp + k * L.width + L.d_off[m] + i), a);
            a.store(gr + i);
          }
          for (; i < n; ++i) {
            acc_t a = separate_values ? acc_t(0) : g[m] * dout_of(m)[i];
            for (int64_t k = 0; k < L.M; ++k) a += dl[k] * wp[k * L.width + L.d_off[m] + i];
            gr[i] = a;
          }
          store_row<scalar_t, acc_t>(gr, grad_features[m], r, 0, n);
          if (separate_values) {
            const acc_t gm = g[m];
            at::vec::map([gm](V x) { return x * V(gm); }, gr, dout_of(m), L.e[m]);
            store_row<scalar_t, acc_t>(gr, grad_values[m], r, 0, L.e[m]);
          }
        }
      }
      // This block's share of dW = dl^T [f_1 .. f_M] and db = sum dl, column block by column
      // block, while its rows are in cache.
      const int64_t rows = end - begin;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t k = 0; k < L.M; ++k) pb[k] += S.dl[r * L.M + k];
      }
      for (int64_t k = 0; k < L.M; ++k) {
        int64_t c = 0;
        for (; c + V::size() <= L.width; c += V::size()) {
          V a = V::loadu(pw + k * L.width + c);
          for (int64_t r = 0; r < rows; ++r) a = at::vec::fmadd(V(S.dl[r * L.M + k]), V::loadu(S.fblock.data() + r * L.width + c), a);
          a.store(pw + k * L.width + c);
        }
        for (; c < L.width; ++c) {
          acc_t a = pw[k * L.width + c];
          for (int64_t r = 0; r < rows; ++r) a += S.dl[r * L.M + k] * S.fblock[r * L.width + c];
          pw[k * L.width + c] = a;
        }
      }
    };
    cpu::for_each_chunk(L.rows, chunk, make, [&](int64_t chunk_begin, int64_t chunk_end, Scratch& S) {
      acc_t* pw = partial_w.data_ptr<acc_t>() + (chunk_begin / chunk) * L.M * L.width;
      acc_t* pb = partial_b.data_ptr<acc_t>() + (chunk_begin / chunk) * L.M;
      for (int64_t begin = chunk_begin; begin < chunk_end; begin += kRowGrain) {
        const int64_t end = std::min(chunk_end, begin + kRowGrain);
        backward_block(begin, end, S, pw, pb);
      }
    });
  });
  // The chunks in order: one reduction order, whatever thread ran which rows.
  at::Tensor grad_weight = partial_w[0].clone(), grad_bias = partial_b[0].clone();
  for (int64_t c = 1; c < chunks; ++c) {
    grad_weight.add_(partial_w[c]);
    grad_bias.add_(partial_b[c]);
  }
  return {grad_features, grad_weight.to(weight.scalar_type()), grad_bias.to(weight.scalar_type()), grad_values};
}

void define(torch::Library& m) {
  m.impl("native_concat_weighted_fusion", &concat_weighted_fusion_cpu);
  m.impl("native_concat_weighted_fusion_backward", &concat_weighted_fusion_backward_cpu);
}

// The operators get these kernels when this file's instruction set is the one chosen (isa.h).
const bool registered = register_cpu_kernels(MMKERNELS_ISA_NAME, &define, __FILE__, __LINE__);

}  // namespace

}  // namespace mmkernels
