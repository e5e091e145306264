// CPU cross-attention: FlashAttention's blocked online softmax on top of BLAS tiles.
//
// Forward: one task per (batch, query head, block of BQ queries); keys are streamed in blocks of
// BK, so the largest temporary is BQ x BK scores, never Lq x Lk. Key blocks past kv_lengths[b]
// are never touched, so work is proportional to the real keys.
//
// Backward: one task per (batch, kv head). That task owns dK/dV of its kv head and dQ of every
// query head in its group, so there are no atomics and the result is deterministic and
// independent of the thread count. Scores are recomputed from the saved log-sum-exp.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"

namespace mmkernels {
namespace {

constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 512;

struct Lengths {
  const int64_t* kv = nullptr;  // (B,) or null
  const int64_t* q = nullptr;   // (B,) or null
  const bool* mask = nullptr;   // key_padding_mask, True = ignore
  int64_t mask_sb = 0, mask_sk = 0;
  int64_t Lq = 0, Lk = 0;

  int64_t keys(int64_t b) const { return kv ? std::clamp<int64_t>(kv[b], 0, Lk) : Lk; }
  int64_t queries(int64_t b) const { return q ? std::clamp<int64_t>(q[b], 0, Lq) : Lq; }
  bool ignored(int64_t b, int64_t j) const { return mask && mask[b * mask_sb + j * mask_sk]; }
};

Lengths make_lengths(const at::Tensor& kv, const at::Tensor& mask, const at::Tensor& q,
                     int64_t Lq, int64_t Lk) {
  Lengths L;
  L.Lq = Lq;
  L.Lk = Lk;
  if (kv.defined()) L.kv = kv.data_ptr<int64_t>();
  if (q.defined()) L.q = q.data_ptr<int64_t>();
  if (mask.defined()) {
    L.mask = mask.data_ptr<bool>();
    L.mask_sb = mask.stride(0);
    L.mask_sk = mask.stride(1);
  }
  return L;
}

// Sets ignored keys of a rows x n score tile (row-major, leading dim n) to -inf.
template <typename acc_t>
void apply_key_mask(const Lengths& L, int64_t b, int64_t j0, acc_t* s, int64_t rows, int64_t n) {
  if (!L.mask) return;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    if (!L.ignored(b, j0 + j)) continue;
    for (int64_t r = 0; r < rows; ++r) s[r * n + j] = neg_inf;
  }
}

// exp_u20 is the fast vectorised exp (about 20 ulp) that PyTorch's own CPU flash attention uses;
// the error is far below what the fp32 tolerance of the tests allows.

// Online-softmax step for one score tile: rescales the running output o, turns s into
// probabilities relative to the new running max, and updates the running max m and sum l.
template <typename acc_t>
void online_softmax_step(acc_t* s, int64_t rows, int64_t n, acc_t* o, int64_t D, acc_t* m,
                         acc_t* l) {
  using Vec = at::vec::Vectorized<acc_t>;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* sr = s + r * n;
    const acc_t tile_max = at::vec::reduce_all<acc_t>(
        [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, sr, n);
    const acc_t m_new = std::max(m[r], tile_max);
    if (m_new == neg_inf) {  // every key so far is ignored: contributes nothing
      std::fill(sr, sr + n, acc_t(0));
      continue;
    }
    at::vec::map([m_new](Vec x) { return (x - Vec(m_new)).exp_u20(); }, sr, sr, n);
    const acc_t tile_sum =
        at::vec::reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, sr, n);
    const acc_t corr = std::exp(m[r] - m_new);  // exp(-inf) = 0 on the first visible tile
    if (corr != acc_t(1)) {
      acc_t* orow = o + r * D;
      at::vec::map([corr](Vec x) { return x * Vec(corr); }, orow, orow, D);
    }
    l[r] = l[r] * corr + tile_sum;
    m[r] = m_new;
  }
}

// p = exp(s - lse) in place; rows whose lse is +inf (no visible key) become 0.
template <typename acc_t>
void probabilities_from_lse(acc_t* s, int64_t rows, int64_t n, const acc_t* lse) {
  using Vec = at::vec::Vectorized<acc_t>;
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* sr = s + r * n;
    const acc_t sub = lse[r];
    if (std::isinf(sub)) {
      std::fill(sr, sr + n, acc_t(0));
      continue;
    }
    at::vec::map([sub](Vec x) { return (x - Vec(sub)).exp_u20(); }, sr, sr, n);
  }
}

// A (rows x D) slab of q/k/v/out for one (batch, head), converted to the accumulation type.
// For fp32/fp64 inputs this is a strided view, not a copy.
at::Tensor slab(const at::Tensor& t, int64_t b, int64_t h, int64_t start, int64_t len,
                at::ScalarType acc) {
  return t.select(0, b).select(0, h).narrow(0, start, len).to(acc);
}

std::tuple<at::Tensor, at::Tensor> cross_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& kv_lengths, const c10::optional<at::Tensor>& key_padding_mask,
    const c10::optional<at::Tensor>& q_lengths, double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  const int64_t group = Hkv > 0 ? Hq / Hkv : 1;
  const at::ScalarType acc = acc_dtype(q.scalar_type());

  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(acc));
  if (out.numel() == 0) return {out, lse.fill_(std::numeric_limits<double>::infinity())};

  const at::Tensor kv_len = lengths_as_int64(kv_lengths);
  const at::Tensor q_len = lengths_as_int64(q_lengths);
  const at::Tensor mask = key_padding_mask.has_value() ? *key_padding_mask : at::Tensor();
  const Lengths L = make_lengths(kv_len, mask, q_len, Lq, Lk);

  const int64_t q_blocks = (Lq + kBlockQ - 1) / kBlockQ;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cross_attention_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t inf = std::numeric_limits<acc_t>::infinity();
    at::parallel_for(0, B * Hq * q_blocks, 1, [&](int64_t begin, int64_t end) {
      const auto acc_opts = q.options().dtype(acc);
      at::Tensor s_buf = at::empty({kBlockQ * kBlockK}, acc_opts);
      std::vector<acc_t> m(kBlockQ), l(kBlockQ);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / (Hq * q_blocks);
        const int64_t h = (task / q_blocks) % Hq;
        const int64_t i0 = (task % q_blocks) * kBlockQ;
        const int64_t rows = std::min(kBlockQ, Lq - i0);
        const int64_t valid = std::clamp<int64_t>(L.queries(b) - i0, 0, rows);
        const int64_t n_keys = L.keys(b);
        at::Tensor out_tile = out.select(0, b).select(0, h).narrow(0, i0, rows);
        acc_t* lse_tile = lse.data_ptr<acc_t>() + (b * Hq + h) * Lq + i0;
        out_tile.narrow(0, valid, rows - valid).zero_();
        std::fill(lse_tile + valid, lse_tile + rows, inf);
        if (valid == 0) continue;

        const at::Tensor qs = slab(q, b, h, i0, valid, acc) * scale;
        at::Tensor o = at::zeros({valid, D}, acc_opts);
        std::fill(m.begin(), m.begin() + valid, -inf);
        std::fill(l.begin(), l.begin() + valid, acc_t(0));
        for (int64_t j0 = 0; j0 < n_keys; j0 += kBlockK) {
          const int64_t n = std::min(kBlockK, n_keys - j0);
          at::Tensor s = s_buf.narrow(0, 0, valid * n).view({valid, n});
          at::mm_out(s, qs, slab(k, b, h / group, j0, n, acc).t());
          apply_key_mask(L, b, j0, s.data_ptr<acc_t>(), valid, n);
          online_softmax_step(s.data_ptr<acc_t>(), valid, n, o.data_ptr<acc_t>(), D, m.data(),
                              l.data());
          o.addmm_(s, slab(v, b, h / group, j0, n, acc));
        }
        acc_t* op = o.data_ptr<acc_t>();
        for (int64_t r = 0; r < valid; ++r) {
          const bool empty = l[r] == acc_t(0);
          const acc_t inv = empty ? acc_t(0) : acc_t(1) / l[r];
          for (int64_t d = 0; d < D; ++d) op[r * D + d] *= inv;
          lse_tile[r] = empty ? inf : m[r] + std::log(l[r]);
        }
        out_tile.narrow(0, 0, valid).copy_(o);
      }
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& kv_lengths,
    const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& q_lengths,
    double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  const int64_t group = Hkv > 0 ? Hq / Hkv : 1;
  const at::ScalarType acc = acc_dtype(q.scalar_type());

  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::empty_like(k);
  at::Tensor grad_v = at::empty_like(v);
  if (q.numel() == 0 || k.numel() == 0) {
    return {grad_q.zero_(), grad_k.zero_(), grad_v.zero_()};
  }

  const at::Tensor kv_len = lengths_as_int64(kv_lengths);
  const at::Tensor q_len = lengths_as_int64(q_lengths);
  const at::Tensor mask = key_padding_mask.has_value() ? *key_padding_mask : at::Tensor();
  const Lengths L = make_lengths(kv_len, mask, q_len, Lq, Lk);
  const at::Tensor lse_c = lse.to(acc).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cross_attention_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
      const auto acc_opts = q.options().dtype(acc);
      at::Tensor s_buf = at::empty({kBlockQ * kBlockK}, acc_opts);
      at::Tensor dp_buf = at::empty({kBlockQ * kBlockK}, acc_opts);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / Hkv, hk = task % Hkv;
        const int64_t n_keys = L.keys(b), q_valid = L.queries(b);
        at::Tensor dk = at::zeros({n_keys, D}, acc_opts);
        at::Tensor dv = at::zeros({n_keys, D}, acc_opts);
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          at::Tensor gq = grad_q.select(0, b).select(0, h);
          gq.narrow(0, q_valid, Lq - q_valid).zero_();
          for (int64_t i0 = 0; i0 < q_valid; i0 += kBlockQ) {
            const int64_t rows = std::min(kBlockQ, q_valid - i0);
            const at::Tensor qs = slab(q, b, h, i0, rows, acc) * scale;
            const at::Tensor dout = slab(grad_out, b, h, i0, rows, acc);
            // delta_i = rowsum(dO_i * O_i): the softmax-backward term, computed once per tile.
            const at::Tensor delta = (dout * slab(out, b, h, i0, rows, acc)).sum(-1);
            const acc_t* delta_p = delta.data_ptr<acc_t>();
            const acc_t* lse_p = lse_c.data_ptr<acc_t>() + (b * Hq + h) * Lq + i0;
            at::Tensor dq = at::zeros({rows, D}, acc_opts);
            for (int64_t j0 = 0; j0 < n_keys; j0 += kBlockK) {
              const int64_t n = std::min(kBlockK, n_keys - j0);
              const at::Tensor kt = slab(k, b, hk, j0, n, acc);
              const at::Tensor vt = slab(v, b, hk, j0, n, acc);
              at::Tensor p = s_buf.narrow(0, 0, rows * n).view({rows, n});
              at::Tensor ds = dp_buf.narrow(0, 0, rows * n).view({rows, n});
              at::mm_out(p, qs, kt.t());
              apply_key_mask(L, b, j0, p.data_ptr<acc_t>(), rows, n);
              probabilities_from_lse(p.data_ptr<acc_t>(), rows, n, lse_p);
              dv.narrow(0, j0, n).addmm_(p.t(), dout);
              at::mm_out(ds, dout, vt.t());
              acc_t* dsp = ds.data_ptr<acc_t>();
              const acc_t* pp = p.data_ptr<acc_t>();
              for (int64_t r = 0; r < rows; ++r) {
                for (int64_t j = 0; j < n; ++j) {
                  dsp[r * n + j] = pp[r * n + j] * (dsp[r * n + j] - delta_p[r]);
                }
              }
              dk.narrow(0, j0, n).addmm_(ds.t(), qs);
              dq.addmm_(ds, kt);
            }
            gq.narrow(0, i0, rows).copy_(dq.mul_(scale));
          }
        }
        at::Tensor gk = grad_k.select(0, b).select(0, hk);
        at::Tensor gv = grad_v.select(0, b).select(0, hk);
        gk.narrow(0, 0, n_keys).copy_(dk);
        gv.narrow(0, 0, n_keys).copy_(dv);
        gk.narrow(0, n_keys, Lk - n_keys).zero_();
        gv.narrow(0, n_keys, Lk - n_keys).zero_();
      }
    });
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("native_cross_attention", &cross_attention_cpu);
  m.impl("native_cross_attention_backward", &cross_attention_backward_cpu);
}

}  // namespace mmkernels
