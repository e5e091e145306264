// The CUDA attention kernels, run on the CPU by gpu_emulator.h through their real launchers
// (run_forward / run_backward), against attention computed in double: outputs, log-sum-exp and
// all three gradients, over GQA, strided layouts, kv_lengths, key_padding_mask, q_lengths,
// per-row key ranges (kv_start/kv_end), causal, dropout, a batch with no visible key, and tails
// of both lengths. Keys that no query row sees hold NaN: they must never reach a result.
#include "gpu_emulator.h"

#include "../cuda/cross_attention/backward.cuh"
#include "../cuda/cross_attention/forward.cuh"
#include "../philox.h"

#include <cstdio>
#include <random>
#include <string>

namespace {

using mmkernels::attention::Operand;
using mmkernels::attention::Params;

struct Case {
  std::string name;
  int B, Hq, Hkv, Lq, Lk;
  bool kv_lengths, mask, q_lengths, blhd;  // blhd: (B, L, H, D) storage seen as (B, H, L, D)
  bool ranges = false, causal = false;
  double dropout = 0;
};

// Which keys each query row sees: everything the call says, as DESIGN.md §1 defines it.
struct Visibility {
  const Case& c;
  std::vector<int64_t> kv_len, q_len, start, end;
  std::vector<uint8_t> mask;
  bool operator()(int b, int i, int j) const {
    return i < q_len[b] && j < kv_len[b] && !mask[size_t(b) * c.Lk + j] && start[size_t(b) * c.Lq + i] <= j &&
           j < end[size_t(b) * c.Lq + i] && (!c.causal || j <= i + c.Lk - c.Lq);
  }
};

// A (B, H, L, D) operand in T over its own storage, in either layout.
template <typename T>
struct Tensor {
  int B, H, L, D;
  bool blhd;
  std::vector<T> data;
  Tensor(int B, int H, int L, int D, bool blhd) : B(B), H(H), L(L), D(D), blhd(blhd), data(size_t(B) * H * L * D) {}
  Operand operand() {
    if (blhd) return {data.data(), int64_t(L) * H * D, D, int64_t(H) * D};
    return {data.data(), int64_t(H) * L * D, int64_t(L) * D, D};
  }
  T& at(int b, int h, int i, int d) {
    const Operand o = operand();
    return data[b * o.sb + h * o.sh + i * o.sl + d];
  }
  double get(int b, int h, int i, int d) { return static_cast<double>(static_cast<float>(at(b, h, i, d))); }
};

struct Reference {
  std::vector<double> out, lse, dq, dk, dv;  // (B, H, L, D) contiguous; lse (B, Hq, Lq)
};

template <typename T>
Reference attention(const Case& c, int D, Tensor<T>& q, Tensor<T>& k, Tensor<T>& v, Tensor<T>& dout,
                    const Visibility& visible, uint64_t seed, double scale) {
  Reference r;
  r.out.assign(size_t(c.B) * c.Hq * c.Lq * D, 0);
  r.dq.assign(r.out.size(), 0);
  r.lse.assign(size_t(c.B) * c.Hq * c.Lq, INFINITY);
  r.dk.assign(size_t(c.B) * c.Hkv * c.Lk * D, 0);
  r.dv.assign(r.dk.size(), 0);
  const int group = c.Hq / c.Hkv;
  const uint64_t threshold = mmkernels::dropout_threshold(c.dropout);
  const double keep_scale = 1.0 / (1.0 - c.dropout);
  std::vector<double> p(c.Lk), dp(c.Lk), z(c.Lk);
  for (int b = 0; b < c.B; ++b) {
    for (int h = 0; h < c.Hq; ++h) {
      const int hk = h / group;
      for (int i = 0; i < c.Lq; ++i) {
        double mx = -INFINITY;
        for (int j = 0; j < c.Lk; ++j) {
          double s = 0;
          if (visible(b, i, j))
            for (int d = 0; d < D; ++d) s += q.get(b, h, i, d) * k.get(b, hk, j, d);
          p[j] = visible(b, i, j) ? s * scale : -INFINITY;
          mx = std::max(mx, p[j]);
        }
        if (mx == -INFINITY) continue;  // no visible key: 0, +inf, no gradient
        double sum = 0;
        for (int j = 0; j < c.Lk; ++j) sum += (p[j] = std::exp(p[j] - mx));
        const size_t row = ((size_t(b) * c.Hq + h) * c.Lq + i);
        r.lse[row] = mx + std::log(sum);
        std::vector<double> out(D, 0);
        for (int j = 0; j < c.Lk; ++j) {
          p[j] /= sum;
          const mmkernels::Philox4 x = mmkernels::philox4x32(row, static_cast<uint32_t>(j >> 2), seed);
          const double keep = c.dropout == 0 || x.x[j & 3] >= threshold ? keep_scale : 0;
          z[j] = visible(b, i, j) ? p[j] * (c.dropout == 0 ? 1 : keep) : 0;
          dp[j] = 0;
          if (!visible(b, i, j)) continue;  // hidden keys hold NaN
          for (int d = 0; d < D; ++d) {
            dp[j] += dout.get(b, h, i, d) * v.get(b, hk, j, d);
            out[d] += z[j] * v.get(b, hk, j, d);
          }
          dp[j] *= c.dropout == 0 ? 1 : keep;
        }
        double delta = 0;  // rowsum(dO * O)
        for (int d = 0; d < D; ++d) delta += dout.get(b, h, i, d) * out[d];
        for (int d = 0; d < D; ++d) r.out[row * D + d] = out[d];
        for (int j = 0; j < c.Lk; ++j) {
          if (!visible(b, i, j)) continue;
          const double ds = p[j] * (dp[j] - delta);
          const size_t kv_row = (size_t(b) * c.Hkv + hk) * c.Lk + j;
          for (int d = 0; d < D; ++d) {
            r.dq[row * D + d] += scale * ds * k.get(b, hk, j, d);
            r.dk[kv_row * D + d] += scale * ds * q.get(b, h, i, d);
            r.dv[kv_row * D + d] += z[j] * dout.get(b, h, i, d);
          }
        }
      }
    }
  }
  return r;
}

int failures = 0;

// Largest |got - want| against tol * max(1, max |want|), and exact zeros in the rows the padding
// contract zeroes: zero_row[b * L + i].
template <typename T>
void compare(const std::string& what, Tensor<T>& got, const std::vector<double>& want, const std::vector<bool>& zero_row,
             double tol) {
  double err = 0, scale = 1;
  bool zeros_ok = true;
  for (int b = 0; b < got.B; ++b)
    for (int h = 0; h < got.H; ++h)
      for (int i = 0; i < got.L; ++i)
        for (int d = 0; d < got.D; ++d) {
          const double w = want[((size_t(b) * got.H + h) * got.L + i) * got.D + d], g = got.get(b, h, i, d);
          err = std::max(err, std::isnan(g) ? INFINITY : std::abs(g - w));
          scale = std::max(scale, std::abs(w));
          if (zero_row[size_t(b) * got.L + i] && g != 0) zeros_ok = false;
        }
  const bool ok = err <= tol * scale && zeros_ok;
  std::printf("  %-6s max err %.3g (bound %.3g)%s %s\n", what.c_str(), err, tol * scale, zeros_ok ? "" : ", padding not 0",
              ok ? "ok" : "FAILED");
  failures += !ok;
}

template <typename T, int D>
void run_case(const Case& c, const char* dtype, double tol, int kv_splits, int dkdv_splits) {
  std::printf("%s %s D=%d, %d key split%s, %d dK/dV split%s\n", c.name.c_str(), dtype, D, kv_splits,
              kv_splits > 1 ? "s" : "", dkdv_splits, dkdv_splits > 1 ? "s" : "");
  std::mt19937 gen(1234);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform;
  Tensor<T> q(c.B, c.Hq, c.Lq, D, c.blhd), k(c.B, c.Hkv, c.Lk, D, c.blhd), v(c.B, c.Hkv, c.Lk, D, c.blhd);
  Tensor<T> dout(c.B, c.Hq, c.Lq, D, false);
  for (auto* t : {&q, &k, &v, &dout})
    for (auto& x : t->data) x = T(normal(gen));
  Visibility vis{c, std::vector<int64_t>(c.B, c.Lk), std::vector<int64_t>(c.B, c.Lq),
                 std::vector<int64_t>(size_t(c.B) * c.Lq, 0), std::vector<int64_t>(size_t(c.B) * c.Lq, c.Lk),
                 std::vector<uint8_t>(size_t(c.B) * c.Lk, 0)};
  for (int b = 0; b < c.B; ++b) {
    if (c.kv_lengths) vis.kv_len[b] = b == 0 ? 0 : 1 + int(uniform(gen) * c.Lk) % c.Lk;  // batch 0 sees nothing
    if (c.q_lengths) vis.q_len[b] = int(uniform(gen) * (c.Lq + 1)) % (c.Lq + 1);
    if (c.mask)
      for (int j = 0; j < c.Lk; ++j) vis.mask[b * c.Lk + j] = uniform(gen) < 0.3f;
    if (c.ranges) {
      // Two "images": the first half of the text sees the first third of the keys, the second
      // half the last third (the middle third is seen by nobody), row 0 nothing, and some rows
      // a random span; out-of-range and reversed values are clamped or empty.
      for (int i = 0; i < c.Lq; ++i) {
        int64_t& s = vis.start[size_t(b) * c.Lq + i];
        int64_t& e = vis.end[size_t(b) * c.Lq + i];
        if (i == 0) {
          s = 5, e = 5;
        } else if (i % 7 == 3) {
          s = int(uniform(gen) * c.Lk) - 3, e = int(uniform(gen) * (c.Lk + 10));
        } else if (i < c.Lq / 2) {
          s = 0, e = c.Lk / 3;
        } else {
          s = 2 * c.Lk / 3, e = c.Lk + 7;
        }
      }
    }
  }
  std::vector<int64_t> start_clamped(vis.start), end_clamped(vis.end);  // the reference clamps as the kernel does
  for (auto& x : start_clamped) x = std::clamp<int64_t>(x, 0, c.Lk);
  for (auto& x : end_clamped) x = std::clamp<int64_t>(x, 0, c.Lk);
  std::vector<int64_t> raw_start = vis.start, raw_end = vis.end;
  vis.start = start_clamped;
  vis.end = end_clamped;
  // Keys no query row sees hold NaN: they must never reach a result.
  std::vector<bool> seen_key(size_t(c.B) * c.Lk, false);
  for (int b = 0; b < c.B; ++b)
    for (int i = 0; i < c.Lq; ++i)
      for (int j = 0; j < c.Lk; ++j) seen_key[size_t(b) * c.Lk + j] = seen_key[size_t(b) * c.Lk + j] || vis(b, i, j);
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.Hkv; ++h)
      for (int j = 0; j < c.Lk; ++j)
        if (!seen_key[size_t(b) * c.Lk + j])
          for (int d = 0; d < D; ++d) k.at(b, h, j, d) = v.at(b, h, j, d) = T(NAN);

  const double scale = 1.0 / std::sqrt(double(D));
  // Every output starts as NaN: a kernel that skips writing a row (a padded query, a hidden key,
  // an empty split) fails the comparison instead of passing on a zero it never wrote.
  Tensor<T> out(c.B, c.Hq, c.Lq, D, c.blhd), dq(c.B, c.Hq, c.Lq, D, c.blhd);
  Tensor<T> dk(c.B, c.Hkv, c.Lk, D, c.blhd), dv(c.B, c.Hkv, c.Lk, D, c.blhd);
  for (auto* t : {&out, &dq, &dk, &dv})
    for (auto& x : t->data) x = T(NAN);
  std::vector<float> lse(size_t(c.B) * c.Hq * c.Lq, NAN), delta(lse.size(), NAN);
  std::unique_ptr<bool[]> mask_data(new bool[vis.mask.size()]);
  for (size_t i = 0; i < vis.mask.size(); ++i) mask_data[i] = vis.mask[i];
  const int64_t seed = 0x5eed1234abcdLL;

  Params p;
  p.q = q.operand();
  p.k = k.operand();
  p.v = v.operand();
  p.out = out.operand();
  p.dout = dout.operand();
  p.dq = dq.operand();
  p.dk = dk.operand();
  p.dv = dv.operand();
  p.lse = lse.data();
  p.delta = delta.data();
  p.kv_lengths = c.kv_lengths ? vis.kv_len.data() : nullptr;
  p.q_lengths = c.q_lengths ? vis.q_len.data() : nullptr;
  p.kv_start = c.ranges ? raw_start.data() : nullptr;
  p.kv_end = c.ranges ? raw_end.data() : nullptr;
  p.causal = c.causal;
  if (c.dropout > 0) {
    p.seed = &seed;
    p.dropout_threshold = mmkernels::dropout_threshold(c.dropout);
    p.keep_scale = static_cast<float>(1.0 / (1.0 - c.dropout));
  }
  p.mask = c.mask ? mask_data.get() : nullptr;
  p.mask_sb = c.Lk;
  p.mask_sk = 1;
  p.B = c.B, p.Hq = c.Hq, p.Hkv = c.Hkv, p.Lq = c.Lq, p.Lk = c.Lk;
  p.scale = static_cast<float>(scale);
  std::vector<float> partial_out(size_t(kv_splits) * c.B * c.Hq * c.Lq * D, NAN), partial_lse(size_t(kv_splits) * lse.size(), NAN);
  p.kv_splits = kv_splits;
  p.partial_out = partial_out.data();
  p.partial_lse = partial_lse.data();
  std::vector<float> partial_dk(size_t(dkdv_splits) * c.B * c.Hkv * c.Lk * D, NAN), partial_dv(partial_dk.size(), NAN);
  p.dkdv_splits = dkdv_splits;
  p.partial_dk = partial_dk.data();
  p.partial_dv = partial_dv.data();
  mmkernels::attention::run_forward<T, D>(p, nullptr);
  mmkernels::attention::run_backward<T, D>(p, nullptr);

  const Reference r = attention(c, D, q, k, v, dout, vis, static_cast<uint64_t>(seed), scale);
  // Queries that see no key (padded ones included); keys that no query sees.
  std::vector<bool> zero_q(size_t(c.B) * c.Lq), zero_k(size_t(c.B) * c.Lk);
  for (int b = 0; b < c.B; ++b) {
    for (int j = 0; j < c.Lk; ++j) zero_k[size_t(b) * c.Lk + j] = !seen_key[size_t(b) * c.Lk + j];
    for (int i = 0; i < c.Lq; ++i) {
      bool any = false;
      for (int j = 0; j < c.Lk && !any; ++j) any = vis(b, i, j);
      zero_q[size_t(b) * c.Lq + i] = !any;
    }
  }
  compare("out", out, r.out, zero_q, tol);
  double lse_err = 0;
  bool lse_inf_ok = true;
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(r.lse[i])) {
      lse_inf_ok &= std::isinf(lse[i]) && lse[i] > 0;
    } else {
      lse_err = std::max(lse_err, std::abs(double(lse[i]) - r.lse[i]));
    }
  }
  const bool lse_ok = lse_err <= 1e-3 && lse_inf_ok;  // fp32 statistics of exact products
  std::printf("  lse    max err %.3g%s %s\n", lse_err, lse_inf_ok ? "" : ", +inf rows wrong", lse_ok ? "ok" : "FAILED");
  failures += !lse_ok;
  compare("dq", dq, r.dq, zero_q, tol);
  compare("dk", dk, r.dk, zero_k, tol);
  compare("dv", dv, r.dv, zero_k, tol);
}

}  // namespace

// The host's choice of key splits (params.h), on an H100's 132 SMs.
void check_kv_splits() {
  using mmkernels::attention::kv_splits_for;
  struct Expect {
    int64_t q_blocks, lk;
    int splits;
  };
  const Expect cases[] = {
      {32, 4096, 5},    // B4 H8 Lq16 over 4096 image tokens: ceil(132 / 32) CTAs per block
      {132, 4096, 1},   // a full wave already
      {1000, 4096, 1},  // more than a wave
      {1, 4096, 16},    // one block: capped at kMaxKvSplits
      {1, 256, 2},      // 4 key tiles: at least two tiles per split
      {4, 100, 1},      // 2 key tiles: not worth splitting
      {8, 0, 1},        // no keys
  };
  for (const auto& c : cases) {
    const int got = kv_splits_for(c.q_blocks, 132, c.lk);
    const bool ok = got == c.splits;
    std::printf("kv_splits_for(q_blocks=%lld, sms=132, Lk=%lld) = %d %s\n", (long long)c.q_blocks, (long long)c.lk, got,
                ok ? "ok" : "FAILED");
    failures += !ok;
  }
}

// The host's choice of dK/dV splits (params.h), on an H100's 132 SMs.
void check_dkdv_splits() {
  using mmkernels::attention::dkdv_splits_for;
  struct Expect {
    int64_t key_ctas, steps;
    int splits;
  };
  const Expect cases[] = {
      {10, 40, 16},   // B1 Hkv1 Lk577: ceil(264 / 10) = 27, capped at kMaxDkDvSplits
      {10, 6, 3},     // few query steps: at least two each
      {66, 100, 4},   // half a wave: ceil(264 / 66)
      {132, 100, 1},  // a full wave already
      {4, 1, 1},      // one step: nothing to share
  };
  for (const auto& c : cases) {
    const int got = dkdv_splits_for(c.key_ctas, 132, c.steps);
    const bool ok = got == c.splits;
    std::printf("dkdv_splits_for(key_ctas=%lld, sms=132, steps=%lld) = %d %s\n", (long long)c.key_ctas,
                (long long)c.steps, got, ok ? "ok" : "FAILED");
    failures += !ok;
  }
}

// Empty shapes launch nothing and write nothing.
void check_empty() {
  Params p;
  p.B = 0, p.Hq = 2, p.Hkv = 2, p.Lq = 5, p.Lk = 7;
  mmkernels::attention::run_forward<__half, 64>(p, nullptr);
  mmkernels::attention::run_backward<__half, 64>(p, nullptr);
  p.B = 2, p.Lq = 0;
  mmkernels::attention::run_forward<__half, 64>(p, nullptr);
  mmkernels::attention::run_backward<__half, 64>(p, nullptr);
  std::printf("empty shapes: nothing launched ok\n");
}

int main() {
  check_kv_splits();
  check_dkdv_splits();
  check_empty();
  const Case plain{"plain", 1, 2, 2, 70, 130, false, false, false, false};
  const Case ragged{"gqa+kv_lengths+mask+q_lengths, blhd", 3, 4, 2, 37, 129, true, true, true, true};
  const Case gqa{"gqa 4:1 + kv_lengths, Lq > Lk", 2, 4, 1, 80, 65, true, false, false, true};
  const Case single{"Lq = Lk = 1 + mask", 2, 2, 2, 1, 1, false, true, false, false};
  const Case ranges{"ranges + mask + kv_lengths, two images", 2, 4, 2, 70, 200, true, true, false, true, true};
  const Case causal{"causal, Lq < Lk, q_lengths", 2, 2, 1, 45, 150, false, false, true, false, false, true};
  const Case dropout{"dropout 0.3 + ranges + causal", 2, 2, 2, 66, 130, false, false, false, false, true, true, 0.3};
  const Case causal_tall{"causal, Lq > Lk: the first rows see nothing", 2, 2, 2, 150, 70, false, false, false, false, false, true};
  const Case drop_gqa{"dropout 0.2 + gqa + kv_lengths", 2, 4, 2, 40, 100, true, false, false, false, false, false, 0.2};
  // The forward with all keys in one CTA and split three ways (empty splits included), with
  // copies landing at once; then once more with copies landing only when waited for
  // (gpu_emulator.h), unsplit so that every pipeline has several steps.
  // The forward with all keys in one CTA and split three ways, the backward with each key
  // block's query steps in one CTA and split three ways (empty splits included), with copies
  // landing at once; then once more with copies landing only when waited for (gpu_emulator.h),
  // unsplit so that every pipeline has several steps.
  for (const bool lazy : {false, true}) {
    emu::lazy_copies = lazy;
    std::printf("== cp.async copies land %s\n", lazy ? "when waited for" : "at once");
    for (const int splits : lazy ? std::vector<int>{1} : std::vector<int>{1, 3}) {
      // fp16 keeps 11 bits and bf16 8: P, dS and the outputs are rounded once each to them.
      run_case<__half, 64>(plain, "fp16", 3e-3, splits, splits);
      run_case<__nv_bfloat16, 64>(ragged, "bf16", 2.5e-2, splits, splits);
      run_case<__half, 128>(ragged, "fp16", 3e-3, splits, splits);
      run_case<__nv_bfloat16, 128>(gqa, "bf16", 2.5e-2, splits, splits);
      run_case<__half, 64>(single, "fp16", 3e-3, splits, splits);
      run_case<__half, 64>(ranges, "fp16", 3e-3, splits, splits);
      run_case<__nv_bfloat16, 128>(causal, "bf16", 2.5e-2, splits, splits);
      run_case<__half, 128>(dropout, "fp16", 3e-3, splits, splits);
      run_case<__half, 64>(causal_tall, "fp16", 3e-3, splits, splits);
      run_case<__half, 64>(drop_gqa, "fp16", 3e-3, splits, splits);
    }
  }
  if (emu::unfinished_copies) {
    std::printf("a thread exited with cp.async copies it never waited for\n");
    ++failures;
  }
  std::printf(failures ? "%d FAILED\n" : "all passed\n", failures);
  return failures ? 1 : 0;
}
