// CPU decision (late) fusion: out = sum_m w_m * softmax(logits_m) ("prob") or sum_m w_m * logits_m,
// one pass over each row; the weights arrive normalised. Row blocks are taken dynamically
// (parallel.h). The backward recomputes each softmax
// from the logits instead of saving M probability tensors, and reduces the weight gradient over
// fixed row blocks in order, so it does not depend on the thread count.
#include <torch/library.h>

#include <algorithm>
#include <limits>
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
using cpu::exp_and_sum;
using cpu::load_row;
using cpu::store_row;

constexpr int64_t kRowBlock = 64;

// p = softmax(x) (prob) or x itself, into buf.
template <typename acc_t>
const acc_t* probabilities(const acc_t* x, int64_t n, bool prob, acc_t* buf) {
  if (!prob) return x;
  using Vec = at::vec::Vectorized<acc_t>;
  const acc_t mx = at::vec::reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
  std::copy(x, x + n, buf);
  const acc_t inv = acc_t(1) / exp_and_sum(buf, n, mx);
  for (int64_t i = 0; i < n; ++i) buf[i] *= inv;
  return buf;
}

at::Tensor decision_fusion_cpu(at::TensorList logits, const at::Tensor& weights, bool prob) {
  checks::decision(logits, weights);
  const int64_t rows = logits[0].size(0), C = logits[0].size(1), M = static_cast<int64_t>(logits.size());
  const at::ScalarType acc = acc_dtype(logits[0].scalar_type());
  at::Tensor out = empty_output({rows, C}, logits[0].options());
  const at::Tensor w = weights.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits[0].scalar_type(), "decision_fusion_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* wp = w.const_data_ptr<acc_t>();
    struct Scratch {
      std::vector<acc_t> row, p, sum;
    };
    auto make = [&] { return Scratch{std::vector<acc_t>(C), std::vector<acc_t>(C), std::vector<acc_t>(C)}; };
    cpu::for_each_chunk(rows, kRowBlock, make, [&](int64_t begin, int64_t end, Scratch& S) {
      auto &row = S.row, &p = S.p, &sum = S.sum;
      for (int64_t r = begin; r < end; ++r) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t m = 0; m < M; ++m) {
          axpy(wp[m], probabilities(load_row<scalar_t, acc_t>(logits[m], r, row.data()), C, prob, p.data()), sum.data(), C);
        }
        store_row<scalar_t, acc_t>(sum.data(), out, r, 0, C);
      }
    });
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> decision_fusion_backward_cpu(
    const at::Tensor& grad_out, at::TensorList logits, const at::Tensor& weights, bool prob) {
  checks::decision_backward(grad_out, logits, weights);
  const int64_t rows = logits[0].size(0), C = logits[0].size(1), M = static_cast<int64_t>(logits.size());
  const at::ScalarType acc = acc_dtype(logits[0].scalar_type());
  const at::Tensor w = weights.to(acc).contiguous();
  std::vector<at::Tensor> grad_logits;
  for (const auto& l : logits) grad_logits.push_back(empty_output({rows, C}, l.options()));
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  at::Tensor partial = at::zeros({std::max<int64_t>(blocks, 1), M}, w.options());  // per row block
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits[0].scalar_type(), "decision_fusion_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* wp = w.const_data_ptr<acc_t>();
    struct Scratch {
      std::vector<acc_t> row, p, g_buf, grad;
    };
    auto make = [&] { return Scratch{std::vector<acc_t>(C), std::vector<acc_t>(C), std::vector<acc_t>(C), std::vector<acc_t>(C)}; };
    cpu::for_each_task(blocks, make, [&](int64_t block, Scratch& S) {
      acc_t* part = partial.data_ptr<acc_t>() + block * M;
      for (int64_t r = block * kRowBlock; r < std::min(rows, (block + 1) * kRowBlock); ++r) {
        const acc_t* g = load_row<scalar_t, acc_t>(grad_out, r, S.g_buf.data());
        for (int64_t m = 0; m < M; ++m) {
          const acc_t* pm = probabilities(load_row<scalar_t, acc_t>(logits[m], r, S.row.data()), C, prob, S.p.data());
          const acc_t gp = dot(g, pm, C);
          part[m] += gp;
          // prob: d softmax = p * (g - <g, p>); logit: the identity
          for (int64_t i = 0; i < C; ++i) S.grad[i] = wp[m] * (prob ? pm[i] * (g[i] - gp) : g[i]);
          store_row<scalar_t, acc_t>(S.grad.data(), grad_logits[m], r, 0, C);
        }
      }
    });
  });
  // The blocks' partials in order: the same sum whatever thread ran which block.
  at::Tensor grad_weights = partial[0].clone();
  for (int64_t b = 1; b < partial.size(0); ++b) grad_weights.add_(partial[b]);
  return {grad_logits, grad_weights};
}

void define(torch::Library& m) {
  m.impl("native_decision_fusion", &decision_fusion_cpu);
  m.impl("native_decision_fusion_backward", &decision_fusion_backward_cpu);
}

// The operators get these kernels when this file's instruction set is the one chosen (isa.h).
const bool registered = register_cpu_kernels(MMKERNELS_ISA_NAME, &define, __FILE__, __LINE__);

}  // namespace

}  // namespace mmkernels
