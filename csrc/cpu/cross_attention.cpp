// CPU cross-attention: FlashAttention's blocked online softmax on register-tiled micro-kernels.
//
// Forward: one task per (batch, query head, block of kBlockQ queries), taken dynamically by the
// threads (parallel.h). A task computes each of its rows' visible key range (kv_start/kv_end,
// kv_lengths, causal, and the first/last key the key_padding_mask leaves), and walks only the key
// tiles that meet their union: padded, masked-out and out-of-range tiles are never read. A tile
// that every row sees whole ("clean") runs plain products; a "ragged" tile (a range boundary,
// the causal diagonal, masked keys) hides scores key by key, and if the keys it hides from some
// row hold non-finite values, forms that row's sums over its visible keys only, so hidden keys
// never influence anything. Dropout multiplies the probabilities by a Philox mask (philox.h).
//
// Backward: one task per (batch, kv head). It owns dK/dV of its kv head and dQ of every query
// head in its group, so there are no atomics and the result does not depend on the thread
// count. It visits the same (query block, key tile) pairs as the forward, recomputing the
// probabilities from the saved statistics as exp((s - max) - log(sum)). For float32/float64 inputs
// the row max and log(sum) are saved apart (Stats), so sharp softmaxes (learned temperatures,
// huge scores, ties) get back the forward's probabilities to the last bit.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../common.h"
#include "../isa.h"
#include "../philox.h"
#include "microkernel.h"
#include "parallel.h"
#include "vec.h"

namespace mmkernels {
namespace {

using cpu::kPanel;
using cpu::round_up;
using cpu::Vec;

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 128;

// Which keys each query row sees, for one call. Every bound is clamped, so malformed values
// can never index out of range.
struct Visibility {
  int64_t B = 0, Hq = 0, Lq = 0, Lk = 0;
  const int64_t* kv_len = nullptr;  // (B,)
  const int64_t* q_len = nullptr;   // (B,)
  const int64_t* start = nullptr;   // (B, Lq)
  const int64_t* end = nullptr;     // (B, Lq)
  const bool* mask = nullptr;       // key_padding_mask, true = hidden
  int64_t mask_sb = 0, mask_sk = 0;
  bool causal = false;
  std::vector<int64_t> mask_lo, mask_hi;  // per batch: the first visible key and one past the last

  bool hidden(int64_t b, int64_t j) const { return mask != nullptr && mask[b * mask_sb + j * mask_sk]; }

  int64_t queries(int64_t b) const { return q_len ? std::clamp<int64_t>(q_len[b], 0, Lq) : Lq; }

  // [lo, hi) holding every key row i of batch b may see (empty when hi <= lo); keys inside it
  // may still be hidden by the mask.
  std::pair<int64_t, int64_t> range(int64_t b, int64_t i) const {
    int64_t lo = start ? std::clamp<int64_t>(start[b * Lq + i], 0, Lk) : 0;
    int64_t hi = end ? std::clamp<int64_t>(end[b * Lq + i], 0, Lk) : Lk;
    if (kv_len) hi = std::min(hi, std::clamp<int64_t>(kv_len[b], 0, Lk));
    if (causal) hi = std::min(hi, i + 1 + Lk - Lq);
    if (mask) {
      lo = std::max(lo, mask_lo[b]);
      hi = std::min(hi, mask_hi[b]);
    }
    if (i >= queries(b) || hi <= lo) return {0, 0};
    return {lo, hi};
  }

  // 0: every key of [j0, j1) is visible to the mask, 1: some are hidden, 2: all are.
  int mask_state(int64_t b, int64_t j0, int64_t j1) const {
    if (!mask) return 0;
    int64_t n_hidden = 0;
    for (int64_t j = j0; j < j1; ++j) n_hidden += hidden(b, j);
    return n_hidden == 0 ? 0 : (n_hidden == j1 - j0 ? 2 : 1);
  }
};

Visibility make_visibility(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kv_len, const at::Tensor& q_len,
                           const at::Tensor& start, const at::Tensor& end, const c10::optional<at::Tensor>& mask,
                           bool causal) {
  Visibility V;
  V.B = q.size(0);
  V.Hq = q.size(1);
  V.Lq = q.size(2);
  V.Lk = k.size(2);
  V.causal = causal;
  if (kv_len.defined()) V.kv_len = kv_len.data_ptr<int64_t>();
  if (q_len.defined()) V.q_len = q_len.data_ptr<int64_t>();
  if (start.defined()) V.start = start.data_ptr<int64_t>();
  if (end.defined()) V.end = end.data_ptr<int64_t>();
  if (mask.has_value()) {
    V.mask = mask->data_ptr<bool>();
    V.mask_sb = mask->stride(0);
    V.mask_sk = mask->stride(1);
    V.mask_lo.assign(V.B, 0);
    V.mask_hi.assign(V.B, 0);
    for (int64_t b = 0; b < V.B; ++b) {
      int64_t lo = 0, hi = V.Lk;
      while (lo < hi && V.hidden(b, lo)) ++lo;
      while (hi > lo && V.hidden(b, hi - 1)) --hi;
      V.mask_lo[b] = lo;
      V.mask_hi[b] = hi;
    }
  }
  return V;
}

// One operand (q, k, v, out, grad_out and the gradients) as rows of D values per (batch, head),
// any strides with a contiguous last dim; offsets are 64-bit.
template <typename scalar_t>
struct Rows {
  scalar_t* base;
  int64_t sb, sh, sl;

  explicit Rows(const at::Tensor& t)
      : base(static_cast<scalar_t*>(t.data_ptr())), sb(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)) {}

  scalar_t* row(int64_t b, int64_t h, int64_t i) const { return base + b * sb + h * sh + i * sl; }

  template <typename acc_t>
  void store(int64_t b, int64_t h, int64_t i, const acc_t* src, int64_t D, acc_t scale) const {
    scalar_t* dst = row(b, h, i);
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(scale * src[d]);
  }

  void zero(int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t D) const {
    for (int64_t i = i0; i < i1; ++i) std::fill(row(b, h, i), row(b, h, i) + D, scalar_t(0));
  }
};

// The attention dropout of one (batch, head): keep draws >= threshold, scale kept ones.
struct Dropout {
  bool on = false;
  uint64_t seed = 0, threshold = 0;
  double keep_scale = 1.0;

  // Multiplies p[c * stride] (keys j0 + c, c < n) of query row `row` (the (b * Hq + h) * Lq + i
  // index) by keep / (1 - p).
  template <typename acc_t>
  void apply(acc_t* p, int64_t n, int64_t stride, int64_t row, int64_t j0) const {
    const acc_t s = static_cast<acc_t>(keep_scale);
    int64_t c = 0;
    while (c < n) {
      const int64_t j = j0 + c;
      const Philox4 r = philox4x32(static_cast<uint64_t>(row), static_cast<uint32_t>(j >> 2), seed);
      for (int64_t e = j & 3; e < 4 && c < n; ++e, ++c) p[c * stride] = r.x[e] >= threshold ? p[c * stride] * s : acc_t(0);
    }
  }
};

Dropout make_dropout(double p, const c10::optional<at::Tensor>& seed) {
  Dropout d;
  if (p <= 0) return d;
  TORCH_CHECK(seed.has_value() && seed->numel() >= 1 && seed->scalar_type() == at::kLong && seed->device().is_cpu(),
              "seed must be an int64 tensor with one element on the cpu when dropout_p > 0, got ",
              seed.has_value() ? c10::str(seed->scalar_type(), " of shape ", seed->sizes(), " on ", seed->device()) : "None");
  d.on = true;
  d.seed = static_cast<uint64_t>(seed->contiguous().data_ptr<int64_t>()[0]);
  d.threshold = dropout_threshold(p);
  d.keep_scale = 1.0 / (1.0 - p);
  return d;
}

// The rows of one query block: their key ranges and the union of those that are not empty.
struct QueryBlock {
  int64_t b, i0, rows;
  std::vector<int64_t> lo, hi;
  int64_t first = 0, last = 0;  // union of the rows' ranges, empty when last <= first

  QueryBlock(const Visibility& V, int64_t b_, int64_t i0_, int64_t rows_)
      : b(b_), i0(i0_), rows(rows_), lo(rows_), hi(rows_) {
    first = V.Lk;
    for (int64_t r = 0; r < rows; ++r) {
      std::tie(lo[r], hi[r]) = V.range(b, i0 + r);
      if (hi[r] > lo[r]) {
        first = std::min(first, lo[r]);
        last = std::max(last, hi[r]);
      }
    }
  }

  bool active(int64_t r) const { return hi[r] > lo[r]; }

  // What the rows make of keys [j0, j1): 0 nobody sees any, 1 every active row sees them all,
  // 2 it differs by row or by key.
  int tile_kind(const Visibility& V, int64_t j0, int64_t j1) const {
    bool any = false, whole = true;
    for (int64_t r = 0; r < rows; ++r) {
      if (!active(r)) continue;
      if (lo[r] < j1 && hi[r] > j0) any = true;
      if (lo[r] > j0 || hi[r] < j1) whole = false;
    }
    if (!any) return 0;
    const int m = V.mask_state(b, j0, j1);
    if (m == 2) return 0;
    return whole && m == 0 ? 1 : 2;
  }

  bool visible(const Visibility& V, int64_t r, int64_t j) const { return j >= lo[r] && j < hi[r] && !V.hidden(b, j); }
};

template <typename T>
bool all_finite(const T* x, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      if (!std::isfinite(x[r * ld + c])) return false;
    }
  }
  return true;
}

// rows (a, ld) of a K or V tile in acc_t with Dp columns: the tensor itself when it already is
// (fp32/fp64 with D a multiple of the vector width), else a widened, zero-padded copy in buf.
template <typename scalar_t, typename acc_t>
bool tile_rows_copy(int64_t D, int64_t Dp) {  // whether tile_rows needs its buffer
  return !std::is_same_v<scalar_t, acc_t> || D != Dp;
}

template <typename scalar_t, typename acc_t>
std::pair<const acc_t*, int64_t> tile_rows(const Rows<scalar_t>& X, int64_t b, int64_t h, int64_t j0, int64_t n,
                                           int64_t D, int64_t Dp, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (!tile_rows_copy<scalar_t, acc_t>(D, Dp)) return {X.row(b, h, j0), X.sl};
  }
  cpu::pack_rows(X.row(b, h, j0), X.sl, n, D, acc_t(1), buf, Dp);
  return {buf, Dp};
}

// Score tiles are key-major: st[t * ld + r] for key j0 + t and query row i0 + r, so that the
// softmax runs down the keys with the query rows in the vector lanes.

// Hides the scores of keys each row does not see (-inf) in a ragged tile; marks the rows that see
// at least one key here.
template <typename T>
void hide_scores(const QueryBlock& blk, const Visibility& V, int64_t j0, int64_t n, T* st, int64_t ld, char* seen) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < blk.rows; ++r) {
    if (!blk.active(r)) continue;
    for (int64_t t = 0; t < n; ++t) {
      if (blk.visible(V, r, j0 + t)) {
        seen[r] = 1;
      } else {
        st[t * ld + r] = neg_inf;
      }
    }
  }
}

// c[r] += sum over the keys j0 + t that row r sees of w[t][r] * x[t] (forward: P V; backward:
// dS K), or with transposed = true, c[t] += sum over the rows r that see key j0 + t of
// w[t][r] * x[r] (P^T dO, dS^T Q): the key-by-key form of those products, for a ragged tile whose
// hidden keys (or rows) hold non-finite values, where 0 * NaN must not reach a visible sum.
template <typename T>
void visible_sum(bool transposed, const QueryBlock& blk, const Visibility& V, int64_t j0, int64_t n, const T* w,
                 int64_t ldw, const T* x, int64_t ldx, T* c, int64_t ldc, int64_t D) {
  for (int64_t r = 0; r < blk.rows; ++r) {
    if (!blk.active(r)) continue;
    for (int64_t t = 0; t < n; ++t) {
      if (!blk.visible(V, r, j0 + t)) continue;
      if (transposed) {
        cpu::axpy(w[t * ldw + r], x + r * ldx, c + t * ldc, D);
      } else {
        cpu::axpy(w[t * ldw + r], x + t * ldx, c + r * ldc, D);
      }
    }
  }
}

// Scores times the scale, after the product (as the composite softmax((q k^T) * scale) computes
// them: scaling q first rounds every element of it once more).
template <typename T>
void scale_tile(T* st, int64_t n, int64_t ld, int64_t rows, T scale) {
  using VT = Vec<T>;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t r = 0; r < rows; r += VT::size()) (VT::loadu(st + t * ld + r) * VT(scale)).store(st + t * ld + r);
  }
}

// One online-softmax step over a key-major tile (n keys x the block's rows, ld): st becomes
// exp(st - m_new) with m_new the running max of each row, l and m are updated, and the returned
// corrections exp(m_old - m_new) are what each row's output must be multiplied by.
template <typename T>
void online_softmax(T* st, int64_t n, int64_t ld, int64_t rows, T* m, T* l, T* corr) {
  using VT = Vec<T>;
  const VT neg_inf(-std::numeric_limits<T>::infinity()), zero(T(0));
  for (int64_t r = 0; r < rows; r += VT::size()) {
    VT mx = VT::loadu(m + r);
    const VT m_old = mx;
    for (int64_t t = 0; t < n; ++t) mx = at::vec::maximum(mx, VT::loadu(st + t * ld + r));  // NaN wins
    // A row that has seen only hidden keys keeps m = -inf; subtracting 0 then keeps exp at 0.
    const VT base = VT::blendv(mx, zero, mx == neg_inf);
    VT sum = zero;
    for (int64_t t = 0; t < n; ++t) {
      const VT p = (VT::loadu(st + t * ld + r) - base).exp_u20();
      p.store(st + t * ld + r);
      sum = sum + p;
    }
    const VT c = (m_old - base).exp_u20();
    (VT::loadu(l + r) * c + sum).store(l + r);
    mx.store(m + r);
    c.store(corr + r);
  }
}

// The softmax statistics of each query row (mmkernels.backends.base.stats_shape): for half inputs
// the log-sum-exp (float); for float32/float64 the row max and the log of the row sum apart
// (double), so that the backward's exp((s - max) - log(sum)) is the forward's probability even
// when max + log(sum) would round the sum away.
template <bool kPair>
struct Stats {
  using T = std::conditional_t<kPair, double, float>;
  T* p;

  void store(int64_t row, double max, double log_sum) const {
    if constexpr (kPair) {
      p[2 * row] = max;
      p[2 * row + 1] = log_sum;
    } else {
      p[row] = static_cast<T>(max + log_sum);
    }
  }
  void no_key(int64_t row) const { store(row, std::numeric_limits<double>::infinity(), 0); }  // P = exp(s - inf) = 0
  void overflowed(int64_t row) const { store(row, -std::numeric_limits<double>::infinity(), 0); }

  // (max, log sum) as acc_t; a row whose statistic is not finite gets log sum 0.
  template <typename acc_t>
  std::pair<acc_t, acc_t> load(int64_t row) const {
    if constexpr (kPair) return {static_cast<acc_t>(p[2 * row]), static_cast<acc_t>(p[2 * row + 1])};
    return {static_cast<acc_t>(p[row]), acc_t(0)};
  }
};

template <typename scalar_t, bool kPair>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                    const at::Tensor& lse, const Visibility& V, const Dropout& drop, double scale) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t P = kPanel<acc_t>;
  const int64_t B = V.B, Hq = V.Hq, Lq = V.Lq, D = q.size(3);
  const int64_t group = Hq / k.size(1);
  const int64_t Dp = round_up(std::max<int64_t>(D, 1), cpu::kLanes<acc_t>);  // padded head dim
  const int64_t Rp = round_up(std::clamp<int64_t>(Lq, 1, kBlockQ), P);     // score tile row width (a short Lq, a small tile)
  const Rows<scalar_t> Q(q), K(k), Vv(v), O(out);
  const Stats<kPair> stats{lse.data_ptr<typename Stats<kPair>::T>()};
  const int64_t q_blocks = (Lq + kBlockQ - 1) / kBlockQ;

  struct Scratch {
    std::vector<acc_t> qt, kbuf, vbuf, st, o, m, l, corr;
    std::vector<char> seen;
  };
  auto make = [&] {
    return Scratch{std::vector<acc_t>(Rp * Dp),     std::vector<acc_t>(kBlockK * Dp), std::vector<acc_t>(kBlockK * Dp),
                   std::vector<acc_t>(kBlockK * Rp), std::vector<acc_t>(Rp * Dp),      std::vector<acc_t>(Rp),
                   std::vector<acc_t>(Rp),           std::vector<acc_t>(Rp),           std::vector<char>(Rp)};
  };
  const int64_t work = 2 * B * Hq * Lq * k.size(2) * Dp;  // QK^T and PV, every key: an upper bound
  cpu::for_each_task(B * Hq * q_blocks, make, [&](int64_t task, Scratch& S) {
    const int64_t b = task / (Hq * q_blocks), h = (task / q_blocks) % Hq, hk = h / group;
    const int64_t i0 = (task % q_blocks) * kBlockQ, rows = std::min(kBlockQ, Lq - i0);
    const int64_t rp = round_up(rows, P);
    const QueryBlock blk(V, b, i0, rows);
    const int64_t row0 = (b * Hq + h) * Lq + i0;
    if (blk.last <= blk.first) {  // no row sees a key: all 0
      O.zero(b, h, i0, i0 + rows, D);
      for (int64_t r = 0; r < rows; ++r) stats.no_key(row0 + r);
      return;
    }
    cpu::pack_panels(Q.row(b, h, i0), Q.sl, rows, D, Dp, acc_t(1), S.qt.data());
    std::fill(S.o.begin(), S.o.begin() + rp * Dp, acc_t(0));
    std::fill(S.m.begin(), S.m.end(), -std::numeric_limits<acc_t>::infinity());
    std::fill(S.l.begin(), S.l.end(), acc_t(0));
    std::fill(S.seen.begin(), S.seen.end(), 0);
    for (int64_t j0 = blk.first; j0 < blk.last; j0 += kBlockK) {
      const int64_t n = std::min(kBlockK, blk.last - j0);
      const int kind = blk.tile_kind(V, j0, j0 + n);
      if (kind == 0) continue;
      const auto [kt, ldk] = tile_rows(K, b, hk, j0, n, D, Dp, S.kbuf.data());
      cpu::gemm<acc_t, false>(n, rp, Dp, kt, ldk, 1, S.qt.data(), Dp * P, P, S.st.data(), Rp);  // S^T = K Q^T
      scale_tile(S.st.data(), n, Rp, rp, static_cast<acc_t>(scale));
      if (kind == 2) {
        hide_scores(blk, V, j0, n, S.st.data(), Rp, S.seen.data());
      } else {
        for (int64_t r = 0; r < rows; ++r) S.seen[r] |= blk.active(r);
      }
      online_softmax(S.st.data(), n, Rp, rp, S.m.data(), S.l.data(), S.corr.data());
      for (int64_t r = 0; r < rows; ++r) {
        if (S.corr[r] == acc_t(1)) continue;
        acc_t* o = S.o.data() + r * Dp;
        const acc_t c = S.corr[r];
        at::vec::map([c](Vec<acc_t> x) { return x * Vec<acc_t>(c); }, o, o, Dp);
      }
      if (drop.on) {
        for (int64_t r = 0; r < rows; ++r) drop.apply(S.st.data() + r, n, Rp, (b * Hq + h) * Lq + i0 + r, j0);
      }
      const auto [vt, ldv] = tile_rows(Vv, b, hk, j0, n, D, Dp, S.vbuf.data());
      if (kind == 2 && !all_finite(vt, n, Dp, ldv)) {
        visible_sum(false, blk, V, j0, n, S.st.data(), Rp, vt, ldv, S.o.data(), Dp, Dp);
      } else {
        cpu::gemm<acc_t, true>(rows, Dp, n, S.st.data(), 1, Rp, vt, P, ldv, S.o.data(), Dp);  // O += P V
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t* o = S.o.data() + r * Dp;
      if (!S.seen[r]) {  // no visible key (or a padded query): exactly 0
        O.zero(b, h, i0 + r, i0 + r + 1, D);
        stats.no_key(row0 + r);
      } else if (S.l[r] == acc_t(0)) {  // visible keys whose scores all overflowed: not empty, NaN
        O.store(b, h, i0 + r, o, D, std::numeric_limits<acc_t>::quiet_NaN());
        stats.overflowed(row0 + r);
      } else {
        O.store(b, h, i0 + r, o, D, acc_t(1) / S.l[r]);
        stats.store(row0 + r, static_cast<double>(S.m[r]), std::log(static_cast<double>(S.l[r])));
      }
    }
  }, work);
}

// Decoding: a few query rows (Lq <= kDecodeMaxLq) over many keys. The forward kernel puts query
// rows in the vector lanes, so one row would use a sixteenth of them. Here one task owns a kv head
// and stacks the query heads of its group (grouped-query attention) and their Lq positions as the
// rows of one tile, R = group * Lq, and the keys go in the lanes: S = Q K^T is a product of R
// broadcast rows with a panel-packed K tile, and the softmax runs along each row. Every score is
// the same sequence of FMAs over D as the forward kernel's, so the statistics the backward reads
// match to the bit. When B * Hkv tasks cannot keep the threads busy, the keys are split and the
// partial softmax states (max, sum, unnormalised output) are merged after (flash-decoding).
constexpr int64_t kDecodeMaxLq = 4;

template <typename T>
T nan_max(T a, T b) {  // as at::vec::maximum: NaN wins
  return std::isnan(a) || std::isnan(b) ? std::numeric_limits<T>::quiet_NaN() : std::max(a, b);
}

template <typename acc_t>
struct DecodeState {  // one split's partial softmax state of R rows
  acc_t *m, *l, *o;   // (R,), (R,), (R, Dp)
  char* seen;         // (R,)
};

template <typename scalar_t, bool kPair>
void decode_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                   const at::Tensor& lse, const Visibility& V, const Dropout& drop, double scale) {
  using acc_t = acc_type<scalar_t>;
  using VT = Vec<acc_t>;
  constexpr int64_t P = kPanel<acc_t>;
  const int64_t B = V.B, Hq = V.Hq, Lq = V.Lq, Lk = V.Lk, D = q.size(3), Hkv = k.size(1);
  const int64_t group = Hq / Hkv, R = group * Lq;
  const int64_t Dp = round_up(std::max<int64_t>(D, 1), cpu::kLanes<acc_t>);
  const int64_t Np = round_up(kBlockK, P);  // score row width
  const Rows<scalar_t> Q(q), K(k), Vv(v), O(out);
  const Stats<kPair> stats{lse.data_ptr<typename Stats<kPair>::T>()};
  // Split the keys only when the heads leave threads idle and each split keeps whole tiles.
  const int64_t work = 2 * B * Hq * Lq * Lk * Dp;
  const int64_t threads = std::clamp<int64_t>(work / cpu::kWorkPerThread, 1, at::get_num_threads());
  const int64_t tiles = (Lk + kBlockK - 1) / kBlockK;
  const int64_t splits = B * Hkv >= threads ? 1 : std::min(tiles, (2 * threads + B * Hkv - 1) / (B * Hkv));
  // rows r = g * Lq + i: query head hk * group + g at position i
  auto out_row = [&](int64_t b, int64_t hk, int64_t r) { return (b * Hq + hk * group + r / Lq) * Lq + r % Lq; };
  auto finish = [&](int64_t b, int64_t hk, int64_t r, const DecodeState<acc_t>& st) {
    const int64_t h = hk * group + r / Lq, i = r % Lq, row = out_row(b, hk, r);
    if (!st.seen[r]) {  // no visible key (or a padded query): exactly 0
      O.zero(b, h, i, i + 1, D);
      stats.no_key(row);
    } else if (st.l[r] == acc_t(0)) {  // visible keys whose scores all overflowed: NaN
      O.store(b, h, i, st.o + r * Dp, D, std::numeric_limits<acc_t>::quiet_NaN());
      stats.overflowed(row);
    } else {
      O.store(b, h, i, st.o + r * Dp, D, acc_t(1) / st.l[r]);
      stats.store(row, static_cast<double>(st.m[r]), std::log(static_cast<double>(st.l[r])));
    }
  };
  // Partial states of every split, (B * Hkv * splits, R, Dp + 2) and seen flags, when split.
  std::vector<acc_t> parts(splits > 1 ? B * Hkv * splits * R * (Dp + 2) : 0);
  std::vector<char> parts_seen(splits > 1 ? B * Hkv * splits * R : 0);

  struct Scratch {
    std::vector<acc_t> qrows, kp, vbuf, s, m, l, o;
    std::vector<char> seen;
  };
  const int64_t tile = std::min(kBlockK, Lk);  // a short cache, small buffers
  auto make = [&] {
    return Scratch{std::vector<acc_t>(R * Dp), std::vector<acc_t>(round_up(tile, P) * Dp),
                   std::vector<acc_t>(tile_rows_copy<scalar_t, acc_t>(D, Dp) ? tile * Dp : 0), std::vector<acc_t>(R * Np),
                   std::vector<acc_t>(R), std::vector<acc_t>(R), std::vector<acc_t>(R * Dp), std::vector<char>(R)};
  };
  cpu::for_each_task(B * Hkv * splits, make, [&](int64_t task, Scratch& S) {
    const int64_t b = task / (Hkv * splits), hk = (task / splits) % Hkv, split = task % splits;
    const QueryBlock blk(V, b, 0, Lq);
    DecodeState<acc_t> st{S.m.data(), S.l.data(), S.o.data(), S.seen.data()};
    if (splits > 1) {
      acc_t* base = parts.data() + task * R * (Dp + 2);
      st = {base, base + R, base + 2 * R, parts_seen.data() + task * R};
    }
    std::fill(st.m, st.m + R, -std::numeric_limits<acc_t>::infinity());
    std::fill(st.l, st.l + R, acc_t(0));
    std::fill(st.o, st.o + R * Dp, acc_t(0));
    std::fill(st.seen, st.seen + R, 0);
    // This split's whole tiles of the rows' union of keys.
    const int64_t span_tiles = blk.last > blk.first ? (blk.last - blk.first + kBlockK - 1) / kBlockK : 0;
    const int64_t per = (span_tiles + splits - 1) / splits;
    const int64_t j_begin = blk.first + split * per * kBlockK;
    const int64_t j_end = std::min(blk.last, j_begin + per * kBlockK);
    if (j_begin < j_end) {
      for (int64_t r = 0; r < R; ++r) {
        cpu::pack_rows(Q.row(b, hk * group + r / Lq, r % Lq), Q.sl, 1, D, acc_t(1), S.qrows.data() + r * Dp, Dp);
      }
    }
    for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlockK) {
      const int64_t n = std::min(kBlockK, j_end - j0), np = round_up(n, cpu::kLanes<acc_t>);
      const int kind = blk.tile_kind(V, j0, j0 + n);
      if (kind == 0) continue;
      cpu::pack_panels(K.row(b, hk, j0), K.sl, n, D, Dp, acc_t(1), S.kp.data());
      cpu::gemm<acc_t, false>(R, np, Dp, S.qrows.data(), Dp, 1, S.kp.data(), Dp * P, P, S.s.data(), Np);  // S = Q K^T
      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = r % Lq;
        acc_t* s = S.s.data() + r * Np;
        if (!blk.active(i)) continue;
        at::vec::map([sc = static_cast<acc_t>(scale)](VT x) { return x * VT(sc); }, s, s, n);
        if (kind == 1) st.seen[r] = 1;
        for (int64_t t = 0; kind == 2 && t < n; ++t) {
          if (blk.visible(V, i, j0 + t)) {
            st.seen[r] = 1;
          } else {
            s[t] = -std::numeric_limits<acc_t>::infinity();
          }
        }
        // Online softmax along the row, with the forward kernel's rules: NaN wins the max, a row
        // that has seen only hidden keys keeps m = -inf and exp(s - 0) = 0.
        const acc_t mx = nan_max(st.m[r], at::vec::reduce_all<acc_t>([](VT a, VT b) { return at::vec::maximum(a, b); }, s, n));
        const acc_t base = mx == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : mx;
        const acc_t sum = cpu::exp_and_sum(s, n, base);
        const acc_t c = std::exp(st.m[r] - base);
        st.l[r] = st.l[r] * c + sum;
        st.m[r] = mx;
        if (c != acc_t(1)) at::vec::map([c](VT x) { return x * VT(c); }, st.o + r * Dp, st.o + r * Dp, Dp);
        if (drop.on) drop.apply(s, n, 1, out_row(b, hk, r), j0);
      }
      const auto [vt, ldv] = tile_rows(Vv, b, hk, j0, n, D, Dp, S.vbuf.data());
      if (kind == 2 && !all_finite(vt, n, Dp, ldv)) {  // hidden keys' non-finite values must not meet a 0
        for (int64_t r = 0; r < R; ++r) {
          if (!blk.active(r % Lq)) continue;
          for (int64_t t = 0; t < n; ++t) {
            if (blk.visible(V, r % Lq, j0 + t)) cpu::axpy(S.s[r * Np + t], vt + t * ldv, st.o + r * Dp, Dp);
          }
        }
      } else {
        for (int64_t r = 0; r < R; ++r) {  // rows that see nothing here contribute nothing
          if (!blk.active(r % Lq)) std::fill(S.s.data() + r * Np, S.s.data() + r * Np + n, acc_t(0));
        }
        cpu::gemm<acc_t, true>(R, Dp, n, S.s.data(), Np, 1, vt, P, ldv, st.o, Dp);  // O += P V
      }
    }
    if (splits == 1) {
      for (int64_t r = 0; r < R; ++r) finish(b, hk, r, st);
    }
  }, work);
  if (splits == 1) return;
  // Merge the splits: m = max of the parts' maxima (NaN wins), l and o rescaled by exp(m_s - m).
  cpu::for_each_task(B * Hkv, [&] { return std::vector<acc_t>(R * (Dp + 2) + R); }, [&](int64_t bh, std::vector<acc_t>& buf) {
    const int64_t b = bh / Hkv, hk = bh % Hkv;
    std::vector<char> seen(R, 0);
    DecodeState<acc_t> st{buf.data(), buf.data() + R, buf.data() + 2 * R, seen.data()};
    for (int64_t r = 0; r < R; ++r) {
      acc_t mx = -std::numeric_limits<acc_t>::infinity();
      for (int64_t sp = 0; sp < splits; ++sp) {
        const int64_t task = bh * splits + sp;
        const acc_t ms = parts[task * R * (Dp + 2) + r];
        seen[r] |= parts_seen[task * R + r];
        mx = nan_max(mx, ms);
      }
      const acc_t base = mx == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : mx;
      acc_t l = 0;
      acc_t* o = st.o + r * Dp;
      std::fill(o, o + Dp, acc_t(0));
      for (int64_t sp = 0; sp < splits; ++sp) {
        const acc_t* part = parts.data() + (bh * splits + sp) * R * (Dp + 2);
        if (!parts_seen[(bh * splits + sp) * R + r]) continue;
        const acc_t c = std::exp(part[r] - base);
        l += part[R + r] * c;
        cpu::axpy(c, part + 2 * R + r * Dp, o, Dp);
      }
      st.m[r] = mx;
      st.l[r] = l;
    }
    for (int64_t r = 0; r < R; ++r) finish(b, hk, r, st);
  }, B * Hkv * R * Dp);
}

template <typename scalar_t, bool kPair>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq_t, const at::Tensor& dk_t,
                     const at::Tensor& dv_t, const Visibility& V, const Dropout& drop, double scale) {
  using acc_t = acc_type<scalar_t>;
  using VT = Vec<acc_t>;
  constexpr int64_t P = kPanel<acc_t>;
  const int64_t B = V.B, Hq = V.Hq, Lq = V.Lq, Lk = V.Lk, D = q.size(3), Hkv = k.size(1);
  const int64_t group = Hq / Hkv;
  const int64_t Dp = round_up(std::max<int64_t>(D, 1), cpu::kLanes<acc_t>);
  const int64_t Rp = round_up(std::clamp<int64_t>(Lq, 1, kBlockQ), P);
  const Rows<scalar_t> Q(q), K(k), Vv(v), O(out), dO(grad_out), dQ(dq_t), dK(dk_t), dV(dv_t);
  const Stats<kPair> stats{const_cast<typename Stats<kPair>::T*>(lse.data_ptr<typename Stats<kPair>::T>())};

  struct Scratch {
    std::vector<acc_t> qt, dot, qrow, dorow, kbuf, vbuf, pt, dst, dq, delta, hi, lo, dk, dv;
    std::vector<char> seen;  // unused here: hide_scores reports it for the forward
  };
  auto make = [&] {
    return Scratch{std::vector<acc_t>(Rp * Dp),      std::vector<acc_t>(Rp * Dp),      std::vector<acc_t>(Rp * Dp),
                   std::vector<acc_t>(Rp * Dp),      std::vector<acc_t>(kBlockK * Dp), std::vector<acc_t>(kBlockK * Dp),
                   std::vector<acc_t>(kBlockK * Rp), std::vector<acc_t>(kBlockK * Rp), std::vector<acc_t>(Rp * Dp),
                   std::vector<acc_t>(Rp),           std::vector<acc_t>(Rp),           std::vector<acc_t>(Rp),
                   {},                               {},                               std::vector<char>(Rp)};
  };
  const int64_t work = 5 * B * Hq * Lq * Lk * Dp;  // the backward's five products, every key: an upper bound
  cpu::for_each_task(B * Hkv, make, [&](int64_t task, Scratch& S) {
    const int64_t b = task / Hkv, hk = task % Hkv;
    // dK and dV accumulate only over the keys some query of batch b sees, [k_first, k_last):
    // ranges that show each row a few keys keep the scratch to those keys, not to Lk.
    int64_t k_first = Lk, k_last = 0;
    for (int64_t i0 = 0; i0 < Lq; i0 += kBlockQ) {
      const QueryBlock blk(V, b, i0, std::min(kBlockQ, Lq - i0));
      if (blk.last > blk.first) k_first = std::min(k_first, blk.first), k_last = std::max(k_last, blk.last);
    }
    const int64_t keys = std::max<int64_t>(k_last - k_first, 0);
    S.dk.assign(keys * Dp, acc_t(0));
    S.dv.assign(keys * Dp, acc_t(0));
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      for (int64_t i0 = 0; i0 < Lq; i0 += kBlockQ) {
        const int64_t rows = std::min(kBlockQ, Lq - i0), rp = round_up(rows, P);
        const QueryBlock blk(V, b, i0, rows);
        if (blk.last <= blk.first) {
          dQ.zero(b, h, i0, i0 + rows, D);
          continue;
        }
        cpu::pack_panels(Q.row(b, h, i0), Q.sl, rows, D, Dp, acc_t(1), S.qt.data());
        cpu::pack_panels(dO.row(b, h, i0), dO.sl, rows, D, Dp, acc_t(1), S.dot.data());
        cpu::pack_rows(Q.row(b, h, i0), Q.sl, rows, D, acc_t(1), S.qrow.data(), Dp);
        cpu::pack_rows(dO.row(b, h, i0), dO.sl, rows, D, acc_t(1), S.dorow.data(), Dp);
        const int64_t row0 = (b * Hq + h) * Lq + i0;
        for (int64_t r = 0; r < rp; ++r) {
          // P = exp((s - max) - log(sum)); rows that see no key (max +inf) and padding get P = 0.
          if (r < rows && blk.active(r)) {
            std::tie(S.hi[r], S.lo[r]) = stats.template load<acc_t>(row0 + r);
          } else {
            S.hi[r] = std::numeric_limits<acc_t>::infinity();
            S.lo[r] = 0;
          }
          acc_t sum = 0;  // delta = rowsum(dO * O), the softmax-backward term
          if (r < rows) {
            const scalar_t* o = O.row(b, h, i0 + r);
            for (int64_t d = 0; d < D; ++d) sum += S.dorow[r * Dp + d] * static_cast<acc_t>(o[d]);
          }
          S.delta[r] = sum;
        }
        const bool rows_finite = all_finite(S.qrow.data(), rows, Dp, Dp) && all_finite(S.dorow.data(), rows, Dp, Dp);
        std::fill(S.dq.begin(), S.dq.begin() + rp * Dp, acc_t(0));
        for (int64_t j0 = blk.first; j0 < blk.last; j0 += kBlockK) {
          const int64_t n = std::min(kBlockK, blk.last - j0);
          const int kind = blk.tile_kind(V, j0, j0 + n);
          if (kind == 0) continue;
          const auto [kt, ldk] = tile_rows(K, b, hk, j0, n, D, Dp, S.kbuf.data());
          const auto [vt, ldv] = tile_rows(Vv, b, hk, j0, n, D, Dp, S.vbuf.data());
          cpu::gemm<acc_t, false>(n, rp, Dp, kt, ldk, 1, S.qt.data(), Dp * P, P, S.pt.data(), Rp);    // S^T = K Q^T
          scale_tile(S.pt.data(), n, Rp, rp, static_cast<acc_t>(scale));
          cpu::gemm<acc_t, false>(n, rp, Dp, vt, ldv, 1, S.dot.data(), Dp * P, P, S.dst.data(), Rp);  // dP^T = V dO^T
          if (kind == 2) hide_scores(blk, V, j0, n, S.pt.data(), Rp, S.seen.data());
          for (int64_t t = 0; t < n; ++t) {
            acc_t* p = S.pt.data() + t * Rp;
            for (int64_t r = 0; r < rp; r += VT::size()) {
              const VT s = VT::loadu(p + r);
              ((s - VT::loadu(S.hi.data() + r)) - VT::loadu(S.lo.data() + r)).exp_u20().store(p + r);
            }
          }
          if (drop.on) {  // dP of the kept keys, scaled: what the softmax backward sees
            for (int64_t r = 0; r < rows; ++r) drop.apply(S.dst.data() + r, n, Rp, (b * Hq + h) * Lq + i0 + r, j0);
          }
          // dS^T = P^T (dP^T - delta), exactly 0 where P is 0 (hidden) or 1: a saturated row's
          // softmax has no gradient, which delta - dP (two roundings of one number, by two
          // different sums) would turn into noise times the scale.
          for (int64_t t = 0; t < n; ++t) {
            const acc_t* p = S.pt.data() + t * Rp;
            acc_t* ds = S.dst.data() + t * Rp;
            for (int64_t r = 0; r < rp; r += VT::size()) {
              const VT pv = VT::loadu(p + r);
              const VT g = pv * (VT::loadu(ds + r) - VT::loadu(S.delta.data() + r));
              VT::blendv(g, VT(acc_t(0)), (pv == VT(acc_t(0))) | (pv == VT(acc_t(1)))).store(ds + r);
            }
          }
          if (drop.on) {  // P as it weighted V, for dV
            for (int64_t r = 0; r < rows; ++r) drop.apply(S.pt.data() + r, n, Rp, (b * Hq + h) * Lq + i0 + r, j0);
          }
          // Hidden pairs have P = dS = 0 exactly; only a non-finite K (in dS K) or Q/dO row (in
          // dS^T Q, P^T dO) could turn such a 0 into a NaN. V enters only through dP, whose
          // hidden entries dS ignores.
          if (kind == 2 && !(rows_finite && all_finite(kt, n, Dp, ldk))) {
            visible_sum(false, blk, V, j0, n, S.dst.data(), Rp, kt, ldk, S.dq.data(), Dp, Dp);
            visible_sum(true, blk, V, j0, n, S.pt.data(), Rp, S.dorow.data(), Dp, S.dv.data() + (j0 - k_first) * Dp, Dp, Dp);
            visible_sum(true, blk, V, j0, n, S.dst.data(), Rp, S.qrow.data(), Dp, S.dk.data() + (j0 - k_first) * Dp, Dp, Dp);
          } else {
            cpu::gemm<acc_t, true>(rows, Dp, n, S.dst.data(), 1, Rp, kt, P, ldk, S.dq.data(), Dp);  // dQ += dS K
            cpu::gemm<acc_t, true>(n, Dp, rows, S.pt.data(), Rp, 1, S.dorow.data(), P, Dp,
                                   S.dv.data() + (j0 - k_first) * Dp, Dp);  // dV += P^T dO
            cpu::gemm<acc_t, true>(n, Dp, rows, S.dst.data(), Rp, 1, S.qrow.data(), P, Dp,
                                   S.dk.data() + (j0 - k_first) * Dp, Dp);  // dK += dS^T Q (scaled at the end)
          }
        }
        for (int64_t r = 0; r < rows; ++r) dQ.store(b, h, i0 + r, S.dq.data() + r * Dp, D, static_cast<acc_t>(scale));
      }
    }
    dK.zero(b, hk, 0, k_first, D);
    dV.zero(b, hk, 0, k_first, D);
    for (int64_t j = k_first; j < k_last; ++j) {
      dK.store(b, hk, j, S.dk.data() + (j - k_first) * Dp, D, static_cast<acc_t>(scale));
      dV.store(b, hk, j, S.dv.data() + (j - k_first) * Dp, D, acc_t(1));
    }
    dK.zero(b, hk, std::max(k_last, k_first), Lk, D);
    dV.zero(b, hk, std::max(k_last, k_first), Lk, D);
  }, work);
}

void check_operand(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.device() == q.device() && t.scalar_type() == q.scalar_type(), name, " must have q's dtype and device (",
              q.scalar_type(), " on ", q.device(), "), got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (B, H, L, D), got shape ", t.sizes());
  check_last_dim_contiguous(t, name);
}

// Everything native_cross_attention and its backward index, checked: a malformed direct call
// raises instead of reading out of bounds.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& kv_lengths, const c10::optional<at::Tensor>& key_padding_mask,
                  const c10::optional<at::Tensor>& q_lengths, const c10::optional<at::Tensor>& kv_start,
                  const c10::optional<at::Tensor>& kv_end) {
  TORCH_CHECK(q.dim() == 4, "q must be 4-D (B, H, L, D), got shape ", q.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "q must be a float tensor, got ", q.scalar_type());
  check_last_dim_contiguous(q, "q");
  check_operand(k, q, "k");
  check_operand(v, q, "v");
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "k must be (B=", B, ", Hkv, Lk, D=", D, ") to match q, got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v.sizes());
  const int64_t Hkv = k.size(1);
  TORCH_CHECK((Hkv > 0 && Hq % Hkv == 0) || (Hkv == 0 && Hq == 0),
              "q's heads must be a multiple of k's heads (grouped-query attention), got Hq=", Hq, ", Hkv=", Hkv);
  check_index(kv_lengths, "kv_lengths", q, {B});
  check_index(q_lengths, "q_lengths", q, {B});
  check_index(kv_start, "kv_start", q, {B, Lq});
  check_index(kv_end, "kv_end", q, {B, Lq});
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.device() == q.device(), "key_padding_mask must be bool on q's device (",
                q.device(), "), got ", m.scalar_type(), " on ", m.device());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == k.size(2), "key_padding_mask must have shape (B, Lk) = (",
                B, ", ", k.size(2), "), got ", m.sizes());
  }
}

// Lengths outside [0, limit] are refused on the CPU, where reading them is free (on a GPU the
// kernels clamp them instead: mmkernels/ops/checks.py).
void check_lengths(const at::Tensor& t, const char* name, int64_t limit) {
  if (!t.defined()) return;
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] <= limit, name, " must be in [0, ", limit, "], got ", p[i]);
  }
}

std::tuple<at::Tensor, at::Tensor> cross_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& kv_lengths,
    const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& q_lengths,
    const c10::optional<at::Tensor>& kv_start, const c10::optional<at::Tensor>& kv_end, bool causal, double dropout_p,
    const c10::optional<at::Tensor>& seed, double scale) {
  check_inputs(q, k, v, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end);
  const bool pair = stats_pair(q.scalar_type());
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty(stats_sizes(q), q.options().dtype(pair ? at::kDouble : at::kFloat));
  if (out.numel() == 0 || k.size(2) == 0 || k.size(1) == 0) {  // no key anywhere: 0, statistics of empty rows
    out.zero_();
    if (pair) {
      lse.select(3, 0).fill_(std::numeric_limits<double>::infinity());
      lse.select(3, 1).zero_();
    } else {
      lse.fill_(std::numeric_limits<double>::infinity());
    }
    return {out, lse};
  }
  const at::Tensor kv_len = index_as_int64(kv_lengths), q_len = index_as_int64(q_lengths);
  const at::Tensor start = index_as_int64(kv_start), end = index_as_int64(kv_end);
  check_lengths(kv_len, "kv_lengths", k.size(2));
  check_lengths(q_len, "q_lengths", q.size(2));
  const Visibility V = make_visibility(q, k, kv_len, q_len, start, end, key_padding_mask, causal);
  const Dropout drop = make_dropout(dropout_p, seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cross_attention_cpu", [&] {
    const bool decode = q.size(2) <= kDecodeMaxLq;
    if (pair) {
      (decode ? decode_kernel<scalar_t, true> : forward_kernel<scalar_t, true>)(q, k, v, out, lse, V, drop, scale);
    } else {
      (decode ? decode_kernel<scalar_t, false> : forward_kernel<scalar_t, false>)(q, k, v, out, lse, V, drop, scale);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& kv_lengths,
    const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& q_lengths,
    const c10::optional<at::Tensor>& kv_start, const c10::optional<at::Tensor>& kv_end, bool causal, double dropout_p,
    const c10::optional<at::Tensor>& seed, double scale) {
  check_inputs(q, k, v, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end);
  check_operand(grad_out, q, "grad_out");
  check_operand(out, q, "out");
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "grad_out and out must have q's shape ",
              q.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  const bool pair = stats_pair(q.scalar_type());
  const at::ScalarType stats_type = pair ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.device() == q.device() && lse.sizes() == at::IntArrayRef(stats_sizes(q)) && lse.scalar_type() == stats_type,
              "lse must be the forward's softmax statistics, ", stats_type, " of shape ", at::IntArrayRef(stats_sizes(q)),
              " on q's device, got ", lse.scalar_type(), " of shape ", lse.sizes(), " on ", lse.device());
  at::Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  if (q.numel() == 0 || k.numel() == 0) return {grad_q.zero_(), grad_k.zero_(), grad_v.zero_()};
  const at::Tensor kv_len = index_as_int64(kv_lengths), q_len = index_as_int64(q_lengths);
  const at::Tensor start = index_as_int64(kv_start), end = index_as_int64(kv_end);
  check_lengths(kv_len, "kv_lengths", k.size(2));
  check_lengths(q_len, "q_lengths", q.size(2));
  const Visibility V = make_visibility(q, k, kv_len, q_len, start, end, key_padding_mask, causal);
  const Dropout drop = make_dropout(dropout_p, seed);
  const at::Tensor lse_c = lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cross_attention_backward_cpu", [&] {
    if (pair) {
      backward_kernel<scalar_t, true>(grad_out, q, k, v, out, lse_c, grad_q, grad_k, grad_v, V, drop, scale);
    } else {
      backward_kernel<scalar_t, false>(grad_out, q, k, v, out, lse_c, grad_q, grad_k, grad_v, V, drop, scale);
    }
  });
  return {grad_q, grad_k, grad_v};
}

void define(torch::Library& m) {
  m.impl("native_cross_attention", &cross_attention_cpu);
  m.impl("native_cross_attention_backward", &cross_attention_backward_cpu);
}

// The operators get these kernels when this file's instruction set is the one chosen (isa.h).
const bool registered = register_cpu_kernels(MMKERNELS_ISA_NAME, &define, __FILE__, __LINE__);

}  // namespace

}  // namespace mmkernels
