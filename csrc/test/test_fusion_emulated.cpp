// The CUDA concat_weighted_fusion kernels, run on the CPU by gpu_emulator.h, against the fusion
// computed in double: output, gate, logit gradients, feature and value gradients, for the
// 128-bit (VEC = 16 / sizeof(T)) and the scalar access paths, sum and concat outputs, strided
// rows and up to 8 modalities, over a grid smaller than the rows (the grid-stride loop).
// The weight gradient is a cuBLAS reduction on the host side and is not covered here.
#include "gpu_emulator.h"

#include "../cuda/concat_weighted_fusion/concat_weighted_fusion.cuh"

#include <cstdio>
#include <random>
#include <string>

namespace {

using mmkernels::fusion::FusionArgs;
using mmkernels::fusion::FusionGrads;

struct Case {
  std::string name;
  std::vector<int> d;  // feature widths
  std::vector<int> e;  // value widths; empty: the features are the values
  bool concat;
  int rows = 37;
  int pad = 8;  // each row is followed by `pad` unused elements: row stride = width + pad
};

int failures = 0;

void check(const std::string& what, double err, double scale, double tol) {
  const bool ok = err <= tol * std::max(1.0, scale);
  std::printf("  %-10s max err %.3g (bound %.3g) %s\n", what.c_str(), err, tol * std::max(1.0, scale), ok ? "ok" : "FAILED");
  failures += !ok;
}

template <typename T>
struct Rows {  // rows x width in T with row stride width + pad
  int rows, width, stride;
  std::vector<T> data;
  Rows(int rows, int width, int pad) : rows(rows), width(width), stride(width + pad), data(size_t(rows) * (width + pad), T(NAN)) {}
  double get(int r, int i) const { return static_cast<float>(data[size_t(r) * stride + i]); }
};

template <typename T, int VEC>
void run_case(const Case& c, const char* dtype, double tol) {
  std::printf("%s %s VEC=%d\n", c.name.c_str(), dtype, VEC);
  const int M = static_cast<int>(c.d.size());
  const bool separate = !c.e.empty();
  const std::vector<int>& e = separate ? c.e : c.d;
  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  auto fill = [&](Rows<T>& t, float scale) {
    for (int r = 0; r < t.rows; ++r)
      for (int i = 0; i < t.width; ++i) t.data[size_t(r) * t.stride + i] = T(scale * normal(gen));
  };

  int total_d = 0, total_e = 0;
  std::vector<int> d_off(M), e_off(M);
  for (int m = 0; m < M; ++m) d_off[m] = total_d, total_d += c.d[m], e_off[m] = total_e, total_e += e[m];
  std::vector<Rows<T>> f, v;
  for (int m = 0; m < M; ++m) f.emplace_back(c.rows, c.d[m], c.pad), fill(f.back(), 1.f);
  if (separate)
    for (int m = 0; m < M; ++m) v.emplace_back(c.rows, e[m], c.pad), fill(v.back(), 1.f);
  Rows<T> w(M, total_d, 0), bias(1, M, 0);
  fill(w, 1.f / std::sqrt(float(total_d)));
  fill(bias, 1.f);
  const int width = c.concat ? total_e : e[0];
  Rows<T> out(c.rows, width, c.pad), dout(c.rows, width, c.pad);
  fill(dout, 1.f);
  std::vector<float> gate(size_t(c.rows) * M), dlogits(gate.size());
  std::vector<Rows<T>> df, dv;
  for (int m = 0; m < M; ++m) df.emplace_back(c.rows, c.d[m], 0);
  if (separate)
    for (int m = 0; m < M; ++m) dv.emplace_back(c.rows, e[m], 0);

  FusionArgs<T> a{};
  a.M = M;
  a.rows = c.rows;
  a.concat = c.concat;
  a.w = w.data.data();
  a.w_ld = w.stride;
  a.bias = bias.data.data();
  for (int m = 0; m < M; ++m) {
    const Rows<T>& vm = separate ? v[m] : f[m];
    a.f[m] = f[m].data.data(), a.f_stride[m] = f[m].stride, a.d[m] = c.d[m], a.d_off[m] = d_off[m];
    a.v[m] = vm.data.data(), a.v_stride[m] = vm.stride, a.e[m] = e[m], a.e_off[m] = e_off[m];
  }
  const dim3 grid(2);  // 16 warps for 37 rows: every warp walks several rows
  constexpr int kThreads = 8 * mmkernels::fusion::kWarp;
  auto nothing = [] {};
  emu::run_grid(mmkernels::fusion::fusion_forward_kernel<T, VEC>, grid, kThreads, nothing, a, out.data.data(),
                int64_t(out.stride), gate.data());
  FusionGrads<T> gr{};
  gr.dout = dout.data.data();
  gr.dout_stride = dout.stride;
  gr.gate = gate.data();
  gr.dlogits = dlogits.data();
  for (int m = 0; m < M; ++m) gr.df[m] = df[m].data.data(), gr.dv[m] = separate ? dv[m].data.data() : nullptr;
  a.bias = nullptr;  // the backward takes the saved gate instead
  emu::run_grid(mmkernels::fusion::fusion_backward_kernel<T, VEC>, grid, kThreads, nothing, a, gr);

  double err[6] = {}, scale[6] = {};  // out, gate, dlogits, df, dv
  auto note = [&](int k, double got, double want) {
    err[k] = std::max(err[k], std::isnan(got) ? INFINITY : std::abs(got - want));
    scale[k] = std::max(scale[k], std::abs(want));
  };
  for (int r = 0; r < c.rows; ++r) {
    std::vector<double> g(M), dl(M);
    double mx = -INFINITY, sum = 0;
    for (int k = 0; k < M; ++k) {
      g[k] = bias.get(0, k);
      for (int m = 0; m < M; ++m)
        for (int i = 0; i < c.d[m]; ++i) g[k] += f[m].get(r, i) * w.get(k, d_off[m] + i);
      mx = std::max(mx, g[k]);
    }
    for (int k = 0; k < M; ++k) sum += (g[k] = std::exp(g[k] - mx));
    double weighted = 0;
    for (int m = 0; m < M; ++m) {
      g[m] /= sum;
      note(1, gate[size_t(r) * M + m], g[m]);
      const Rows<T>& vm = separate ? v[m] : f[m];
      dl[m] = 0;
      for (int i = 0; i < e[m]; ++i) dl[m] += vm.get(r, i) * dout.get(r, (c.concat ? e_off[m] : 0) + i);
      weighted += g[m] * dl[m];
    }
    for (int m = 0; m < M; ++m) dl[m] = g[m] * (dl[m] - weighted), note(2, dlogits[size_t(r) * M + m], dl[m]);
    for (int j = 0; j < width; ++j) {
      double want = 0;
      for (int m = 0; m < M; ++m) {
        const Rows<T>& vm = separate ? v[m] : f[m];
        if (c.concat && j >= e_off[m] && j < e_off[m] + e[m]) want = g[m] * vm.get(r, j - e_off[m]);
        if (!c.concat) want += g[m] * vm.get(r, j);
      }
      note(0, out.get(r, j), want);
    }
    for (int m = 0; m < M; ++m) {
      const int dout_off = c.concat ? e_off[m] : 0;
      for (int i = 0; i < c.d[m]; ++i) {
        double want = 0;
        for (int k = 0; k < M; ++k) want += dl[k] * w.get(k, d_off[m] + i);
        if (!separate) want += g[m] * dout.get(r, dout_off + i);
        note(3, df[m].get(r, i), want);
      }
      if (separate)
        for (int i = 0; i < e[m]; ++i) note(4, dv[m].get(r, i), g[m] * dout.get(r, dout_off + i));
    }
  }
  const char* names[] = {"out", "gate", "dlogits", "dfeatures", "dvalues"};
  for (int k = 0; k < (separate ? 5 : 4); ++k) check(names[k], err[k], scale[k], tol);
  // The pad after each output row is never written.
  bool pad_ok = true;
  for (int r = 0; r < c.rows; ++r)
    for (int i = width; i < out.stride; ++i) pad_ok &= std::isnan(float(out.data[size_t(r) * out.stride + i]));
  std::printf("  %-10s %s\n", "out pad", pad_ok ? "untouched ok" : "written FAILED");
  failures += !pad_ok;
}

}  // namespace

int main() {
  const Case concat{"concat, features as values", {16, 24, 40}, {}, true};
  const Case sum{"sum, separate values", {8, 16, 24}, {32, 32, 32}, false};
  const Case equal{"sum, features as values", {24, 24}, {}, false};
  const Case many{"8 modalities, concat, separate values", {8, 8, 8, 8, 8, 8, 8, 8}, {16, 8, 8, 8, 8, 8, 8, 24}, true};
  run_case<__half, 8>(concat, "fp16", 2e-3);
  run_case<__half, 1>(concat, "fp16", 2e-3);
  run_case<__nv_bfloat16, 8>(sum, "bf16", 1.5e-2);
  run_case<float, 4>(equal, "fp32", 1e-5);
  run_case<float, 1>(many, "fp32", 1e-5);
  run_case<__half, 8>(many, "fp16", 2e-3);
  std::printf(failures ? "%d FAILED\n" : "all passed\n", failures);
  return failures ? 1 : 0;
}
