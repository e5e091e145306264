// CPU concat-weighted fusion. Features and values arrive as (rows, D_m) views with any row stride.
//
// Forward, per row: gate logits from every modality's slice of the weight (the concatenation is
// never built), softmax over modalities, then the weighted sum (or weighted concat) of the
// values while the row is still in cache.
//
// Backward: a row pass produces per-row logit gradients (rows x M, tiny) and every feature/value
// gradient; fusion_weight_grad then reduces them into the weight and bias gradients.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"
#include "vec.h"
#include "../fusion_weight_grad.h"

namespace mmkernels {
namespace {

using cpu::axpy;
using cpu::dot;
using cpu::load_row;
using cpu::store_row;

constexpr int64_t kRowGrain = 64;

struct Layout {
  int64_t M = 0, rows = 0;
  std::vector<int64_t> d, d_off;  // feature widths and their column offsets in the weight
  std::vector<int64_t> e, e_off;  // value widths and their column offsets in a concat output
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
  return L;
}

// softmax over modalities of the gate logits of row r, written to g (M entries).
template <typename scalar_t, typename acc_t>
void gate_row(at::TensorList features, const acc_t* w, int64_t w_ld, const acc_t* bias,
              const Layout& L, int64_t r, acc_t* row_buf, acc_t* g) {
  for (int64_t k = 0; k < L.M; ++k) g[k] = bias ? bias[k] : acc_t(0);
  for (int64_t m = 0; m < L.M; ++m) {
    const acc_t* f = load_row<scalar_t, acc_t>(features[m], r, row_buf);
    for (int64_t k = 0; k < L.M; ++k) g[k] += dot(f, w + k * w_ld + L.d_off[m], L.d[m]);
  }
  const acc_t mx = *std::max_element(g, g + L.M);
  acc_t sum = 0;
  for (int64_t k = 0; k < L.M; ++k) sum += (g[k] = std::exp(g[k] - mx));
  for (int64_t k = 0; k < L.M; ++k) g[k] /= sum;
}

std::tuple<at::Tensor, at::Tensor> concat_weighted_fusion_cpu(
    at::TensorList features, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::TensorList values, bool concat) {
  const Layout L = make_layout(features, values);
  const auto& vals = values.empty() ? features : values;
  const at::ScalarType acc = acc_dtype(features[0].scalar_type());
  const int64_t out_width = concat ? L.e_off.back() + L.e.back() : L.e[0];
  at::Tensor out = at::empty({L.rows, out_width}, features[0].options());
  at::Tensor gate = at::empty({L.rows, L.M}, features[0].options().dtype(acc));
  const at::Tensor w = weight.to(acc).contiguous();  // M x sum(D): small, read by every row
  const at::Tensor b = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "concat_weighted_fusion_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* bp = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, L.rows, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row_buf(std::max(L.max_d, L.max_e)), acc_row(L.max_e);
      for (int64_t r = begin; r < end; ++r) {
        acc_t* g = gate.data_ptr<acc_t>() + r * L.M;
        gate_row<scalar_t, acc_t>(features, wp, w.stride(0), bp, L, r, row_buf.data(), g);
        if (concat) {
          for (int64_t m = 0; m < L.M; ++m) {
            const acc_t* val = load_row<scalar_t, acc_t>(vals[m], r, row_buf.data());
            for (int64_t i = 0; i < L.e[m]; ++i) acc_row[i] = g[m] * val[i];
            store_row<scalar_t, acc_t>(acc_row.data(), out, r, L.e_off[m], L.e[m]);
          }
        } else {
          std::fill(acc_row.begin(), acc_row.end(), acc_t(0));
          for (int64_t m = 0; m < L.M; ++m) {
            axpy(g[m], load_row<scalar_t, acc_t>(vals[m], r, row_buf.data()), acc_row.data(), L.e[m]);
          }
          store_row<scalar_t, acc_t>(acc_row.data(), out, r, 0, out_width);
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
  const Layout L = make_layout(features, values);
  const bool separate_values = !values.empty();
  const auto& vals = separate_values ? values : features;
  const at::ScalarType acc = acc_dtype(features[0].scalar_type());
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor g_all = gate.to(acc).contiguous();
  at::Tensor dlogits = at::empty({L.rows, L.M}, gate.options().dtype(acc));

  std::vector<at::Tensor> grad_features, grad_values;
  for (const auto& f : features) grad_features.push_back(at::empty({L.rows, f.size(1)}, f.options()));
  if (separate_values) {
    for (const auto& v : values) grad_values.push_back(at::empty({L.rows, v.size(1)}, v.options()));
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "concat_weighted_fusion_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* wp = w.const_data_ptr<acc_t>();
    at::parallel_for(0, L.rows, kRowGrain, [&](int64_t begin, int64_t end) {
      const int64_t width = std::max(L.max_d, L.max_e);
      std::vector<acc_t> row_buf(width), dout_buf(concat ? L.e_off.back() + L.e.back() : L.e[0]);
      std::vector<acc_t> grad_row(width), dg(L.M);
      for (int64_t r = begin; r < end; ++r) {
        const acc_t* g = g_all.const_data_ptr<acc_t>() + r * L.M;
        const acc_t* dout = load_row<scalar_t, acc_t>(grad_out, r, dout_buf.data());
        auto dout_of = [&](int64_t m) { return concat ? dout + L.e_off[m] : dout; };
        acc_t weighted = 0;
        for (int64_t m = 0; m < L.M; ++m) {
          const acc_t* val = load_row<scalar_t, acc_t>(vals[m], r, row_buf.data());
          dg[m] = dot(dout_of(m), val, L.e[m]);
          weighted += g[m] * dg[m];
        }
        acc_t* dl = dlogits.data_ptr<acc_t>() + r * L.M;
        for (int64_t m = 0; m < L.M; ++m) dl[m] = g[m] * (dg[m] - weighted);
        for (int64_t m = 0; m < L.M; ++m) {
          std::fill(grad_row.begin(), grad_row.begin() + L.d[m], acc_t(0));
          for (int64_t k = 0; k < L.M; ++k) axpy(dl[k], wp + k * w.stride(0) + L.d_off[m], grad_row.data(), L.d[m]);
          if (!separate_values) axpy(g[m], dout_of(m), grad_row.data(), L.d[m]);
          store_row<scalar_t, acc_t>(grad_row.data(), grad_features[m], r, 0, L.d[m]);
          if (separate_values) {
            for (int64_t i = 0; i < L.e[m]; ++i) grad_row[i] = g[m] * dout_of(m)[i];
            store_row<scalar_t, acc_t>(grad_row.data(), grad_values[m], r, 0, L.e[m]);
          }
        }
      }
    });
  });

  auto [grad_weight, grad_bias] = fusion_weight_grad(dlogits, features, weight);
  return {grad_features, grad_weight, grad_bias, grad_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("native_concat_weighted_fusion", &concat_weighted_fusion_cpu);
  m.impl("native_concat_weighted_fusion_backward", &concat_weighted_fusion_backward_cpu);
}

}  // namespace mmkernels
