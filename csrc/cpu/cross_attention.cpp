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
#include "vec.h"
#include "blas.h"

namespace mmkernels {
namespace {

using cpu::dot;
using cpu::exp_and_sum;

constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 256;

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
    // std::max would drop a NaN max and make the row look empty (a silent 0): NaN must win.
    const acc_t m_new = std::isnan(tile_max) ? tile_max : std::max(m[r], tile_max);
    if (m_new == neg_inf) {  // every key so far is ignored: contributes nothing
      std::fill(sr, sr + n, acc_t(0));
      continue;
    }
    const acc_t tile_sum = exp_and_sum(sr, n, m_new);
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

// One operand (q, k, v, out, grad_out) as rows of D values per (batch, head), any strides with a
// contiguous last dim; offsets are 64-bit.
template <typename scalar_t, typename acc_t>
struct Rows {
  scalar_t* base;
  int64_t sb, sh, sl, D;

  explicit Rows(const at::Tensor& t)
      : base(static_cast<scalar_t*>(t.data_ptr())), sb(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)), D(t.size(3)) {}

  scalar_t* row(int64_t b, int64_t h, int64_t i) const { return base + b * sb + h * sh + i * sl; }

  // len rows from `start` as a BLAS operand: the tensor itself for fp32/fp64 whose row stride
  // is a valid leading dim, else a widened (and scaled) copy in buf. Returns (pointer, ld).
  std::pair<const acc_t*, int64_t> tile(int64_t b, int64_t h, int64_t start, int64_t len, acc_t* buf,
                                        acc_t scale = 1) const {
    const int64_t ld = len <= 1 ? D : sl;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (scale == acc_t(1) && ld >= D) return {row(b, h, start), ld};
    }
    for (int64_t r = 0; r < len; ++r) {
      const scalar_t* src = row(b, h, start + r);
      for (int64_t d = 0; d < D; ++d) buf[r * D + d] = scale * static_cast<acc_t>(src[d]);
    }
    return {buf, D};
  }

  void store(int64_t b, int64_t h, int64_t start, int64_t len, const acc_t* src, acc_t scale = 1) const {
    for (int64_t r = 0; r < len; ++r) {
      scalar_t* dst = row(b, h, start + r);
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(scale * src[r * D + d]);
    }
  }

  void zero(int64_t b, int64_t h, int64_t start, int64_t len) const {
    for (int64_t r = start; r < start + len; ++r) std::fill(row(b, h, r), row(b, h, r) + D, scalar_t(0));
  }
};

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
    const Rows<scalar_t, acc_t> Q(q), K(k), V(v), O(out);
    acc_t* lse_p = lse.data_ptr<acc_t>();
    at::parallel_for(0, B * Hq * q_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> q_buf(kBlockQ * D), k_buf(kBlockK * D), v_buf(kBlockK * D),
          s(kBlockQ * kBlockK), o(kBlockQ * D), m(kBlockQ), l(kBlockQ);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / (Hq * q_blocks);
        const int64_t h = (task / q_blocks) % Hq, hk = h / group;
        const int64_t i0 = (task % q_blocks) * kBlockQ;
        const int64_t rows = std::min(kBlockQ, Lq - i0);
        const int64_t valid = std::clamp<int64_t>(L.queries(b) - i0, 0, rows);
        const int64_t n_keys = L.keys(b);
        acc_t* lse_tile = lse_p + (b * Hq + h) * Lq + i0;
        O.zero(b, h, i0 + valid, rows - valid);
        std::fill(lse_tile + valid, lse_tile + rows, inf);
        if (valid == 0) continue;

        const auto [qs, ldq] = Q.tile(b, h, i0, valid, q_buf.data(), static_cast<acc_t>(scale));
        std::fill(o.begin(), o.begin() + valid * D, acc_t(0));
        std::fill(m.begin(), m.begin() + valid, -inf);
        std::fill(l.begin(), l.begin() + valid, acc_t(0));
        for (int64_t j0 = 0; j0 < n_keys; j0 += kBlockK) {
          const int64_t n = std::min(kBlockK, n_keys - j0);
          const auto [kt, ldk] = K.tile(b, hk, j0, n, k_buf.data());
          cpu::gemm<acc_t>(false, true, valid, n, D, 1, qs, ldq, kt, ldk, 0, s.data(), n);
          apply_key_mask(L, b, j0, s.data(), valid, n);
          online_softmax_step(s.data(), valid, n, o.data(), D, m.data(), l.data());
          const auto [vt, ldv] = V.tile(b, hk, j0, n, v_buf.data());
          cpu::gemm<acc_t>(false, false, valid, D, n, 1, s.data(), n, vt, ldv, 1, o.data(), D);
        }
        for (int64_t r = 0; r < valid; ++r) {
          const bool empty = l[r] == acc_t(0);
          const acc_t inv = empty ? acc_t(0) : acc_t(1) / l[r];
          for (int64_t d = 0; d < D; ++d) o[r * D + d] *= inv;
          lse_tile[r] = empty ? inf : m[r] + std::log(l[r]);
        }
        O.store(b, h, i0, valid, o.data());
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
    const Rows<scalar_t, acc_t> Q(q), K(k), V(v), O(out), dO(grad_out), dQ(grad_q), dK(grad_k), dV(grad_v);
    const acc_t* lse_all = lse_c.data_ptr<acc_t>();
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> q_buf(kBlockQ * D), do_buf(kBlockQ * D), o_buf(kBlockQ * D), k_buf(kBlockK * D),
          v_buf(kBlockK * D), p(kBlockQ * kBlockK), ds(kBlockQ * kBlockK), dq(kBlockQ * D), delta(kBlockQ);
      std::vector<acc_t> dk, dv;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / Hkv, hk = task % Hkv;
        const int64_t n_keys = L.keys(b), q_valid = L.queries(b);
        dk.assign(n_keys * D, acc_t(0));
        dv.assign(n_keys * D, acc_t(0));
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          dQ.zero(b, h, q_valid, Lq - q_valid);
          for (int64_t i0 = 0; i0 < q_valid; i0 += kBlockQ) {
            const int64_t rows = std::min(kBlockQ, q_valid - i0);
            const auto [qs, ldq] = Q.tile(b, h, i0, rows, q_buf.data(), static_cast<acc_t>(scale));
            const auto [dout, lddo] = dO.tile(b, h, i0, rows, do_buf.data());
            const auto [o, ldo] = O.tile(b, h, i0, rows, o_buf.data());
            // delta_i = rowsum(dO_i * O_i): the softmax-backward term, once per query tile.
            for (int64_t r = 0; r < rows; ++r) delta[r] = dot(dout + r * lddo, o + r * ldo, D);
            const acc_t* lse_p = lse_all + (b * Hq + h) * Lq + i0;
            std::fill(dq.begin(), dq.begin() + rows * D, acc_t(0));
            for (int64_t j0 = 0; j0 < n_keys; j0 += kBlockK) {
              const int64_t n = std::min(kBlockK, n_keys - j0);
              const auto [kt, ldk] = K.tile(b, hk, j0, n, k_buf.data());
              const auto [vt, ldv] = V.tile(b, hk, j0, n, v_buf.data());
              cpu::gemm<acc_t>(false, true, rows, n, D, 1, qs, ldq, kt, ldk, 0, p.data(), n);
              apply_key_mask(L, b, j0, p.data(), rows, n);
              probabilities_from_lse(p.data(), rows, n, lse_p);
              cpu::gemm<acc_t>(true, false, n, D, rows, 1, p.data(), n, dout, lddo, 1, dv.data() + j0 * D, D);
              cpu::gemm<acc_t>(false, true, rows, n, D, 1, dout, lddo, vt, ldv, 0, ds.data(), n);
              for (int64_t r = 0; r < rows; ++r) {
                acc_t* dsr = ds.data() + r * n;
                const acc_t* pr = p.data() + r * n;
                for (int64_t j = 0; j < n; ++j) dsr[j] = pr[j] * (dsr[j] - delta[r]);
              }
              cpu::gemm<acc_t>(true, false, n, D, rows, 1, ds.data(), n, qs, ldq, 1, dk.data() + j0 * D, D);
              cpu::gemm<acc_t>(false, false, rows, D, n, 1, ds.data(), n, kt, ldk, 1, dq.data(), D);
            }
            dQ.store(b, h, i0, rows, dq.data(), static_cast<acc_t>(scale));
          }
        }
        dK.store(b, hk, 0, n_keys, dk.data());
        dV.store(b, hk, 0, n_keys, dv.data());
        dK.zero(b, hk, n_keys, Lk - n_keys);
        dV.zero(b, hk, n_keys, Lk - n_keys);
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
