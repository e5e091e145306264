// CUDA concat-weighted fusion, the host side: argument packing, the choice between 128-bit and
// scalar accesses, launches on the current stream. The kernels are in concat_weighted_fusion.cuh;
// fusion_weight_grad reduces the weight gradient with cuBLAS, deterministically.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../../checks.h"
#include "../../common.h"
#include "../../fusion_weight_grad.h"
#include "concat_weighted_fusion.cuh"

namespace mmkernels {
namespace {

// fp32 accumulation throughout: float64 inputs are refused (the Python dispatch says so).
#define MMKERNELS_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

constexpr int kWarpsPerBlock = 8;

using namespace fusion;

template <typename T>
FusionArgs<T> make_args(at::TensorList features, const at::Tensor& weight, const T* bias,
                        at::TensorList values, bool concat) {
  TORCH_CHECK(features.size() <= kMaxModalities, "cuda concat_weighted_fusion supports at most ",
              kMaxModalities, " modalities, got ", features.size());
  FusionArgs<T> a{};
  const auto& vals = values.empty() ? features : values;
  a.M = static_cast<int>(features.size());
  a.rows = features[0].size(0);
  a.concat = concat;
  a.w = weight.const_data_ptr<T>();
  a.w_ld = weight.stride(0);
  a.bias = bias;
  int off = 0, eoff = 0;
  for (int m = 0; m < a.M; ++m) {
    a.f[m] = features[m].const_data_ptr<T>();
    a.f_stride[m] = features[m].stride(0);
    a.d[m] = static_cast<int>(features[m].size(1));
    a.d_off[m] = off;
    off += a.d[m];
    a.v[m] = vals[m].const_data_ptr<T>();
    a.v_stride[m] = vals[m].stride(0);
    a.e[m] = static_cast<int>(vals[m].size(1));
    a.e_off[m] = eoff;
    eoff += a.e[m];
  }
  return a;
}

// 128-bit accesses need every row start, width and offset to be a multiple of the vector.
template <typename T>
bool can_vectorize(const FusionArgs<T>& a, std::initializer_list<std::pair<const void*, int64_t>> extra) {
  constexpr int vec = 16 / sizeof(T);
  auto ok = [&](const void* p, int64_t n) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0 && n % vec == 0;
  };
  bool good = ok(a.w, a.w_ld);
  for (int m = 0; m < a.M; ++m) {
    good = good && ok(a.f[m], a.f_stride[m]) && ok(a.v[m], a.v_stride[m]) && a.d[m] % vec == 0 &&
           a.e[m] % vec == 0 && a.d_off[m] % vec == 0 && a.e_off[m] % vec == 0;
  }
  for (const auto& [p, n] : extra) good = good && ok(p, n);
  return good;
}

int grid_for(int64_t rows) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(sms) * 32)));
}

std::tuple<at::Tensor, at::Tensor> concat_weighted_fusion_cuda(
    at::TensorList features, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::TensorList values, bool concat) {
  checks::fusion(features, weight, bias, values, concat);
  const c10::cuda::CUDAGuard guard(features[0].device());
  const auto& vals = values.empty() ? features : values;
  int64_t width = 0;
  for (const auto& v : vals) width = concat ? width + v.size(1) : v.size(1);
  const int64_t rows = features[0].size(0);
  at::Tensor out = at::empty({rows, width}, features[0].options());
  at::Tensor gate = at::empty({rows, static_cast<int64_t>(features.size())},
                              features[0].options().dtype(at::kFloat));
  if (rows == 0) return {out, gate};
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  MMKERNELS_DISPATCH_CUDA_TYPES(features[0].scalar_type(), "concat_weighted_fusion_cuda", [&] {
    const auto a = make_args<scalar_t>(features, w, b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, values, concat);
    constexpr int vec = 16 / sizeof(scalar_t);
    const dim3 grid(grid_for(rows)), block(kWarp * kWarpsPerBlock);
    if (can_vectorize(a, {{out.data_ptr(), out.stride(0)}})) {
      fusion_forward_kernel<scalar_t, vec><<<grid, block, 0, stream>>>(a, out.data_ptr<scalar_t>(), out.stride(0), gate.data_ptr<float>());
    } else {
      fusion_forward_kernel<scalar_t, 1><<<grid, block, 0, stream>>>(a, out.data_ptr<scalar_t>(), out.stride(0), gate.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, gate};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, std::vector<at::Tensor>>
concat_weighted_fusion_backward_cuda(const at::Tensor& grad_out, at::TensorList features,
                                     const at::Tensor& weight, at::TensorList values,
                                     const at::Tensor& gate, bool concat) {
  checks::fusion_backward(grad_out, features, weight, values, gate, concat);
  const c10::cuda::CUDAGuard guard(features[0].device());
  const int64_t rows = features[0].size(0), M = static_cast<int64_t>(features.size());
  const at::Tensor w = weight.contiguous();
  const at::Tensor g = gate.to(at::kFloat).contiguous();
  at::Tensor dlogits = at::empty({rows, M}, g.options());
  std::vector<at::Tensor> grad_features, grad_values;
  for (const auto& f : features) grad_features.push_back(at::empty({rows, f.size(1)}, f.options()));
  for (const auto& v : values) grad_values.push_back(at::empty({rows, v.size(1)}, v.options()));
  if (rows > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    MMKERNELS_DISPATCH_CUDA_TYPES(features[0].scalar_type(), "concat_weighted_fusion_backward_cuda", [&] {
      const auto a = make_args<scalar_t>(features, w, nullptr, values, concat);
      FusionGrads<scalar_t> gr{};
      gr.dout = grad_out.const_data_ptr<scalar_t>();
      gr.dout_stride = grad_out.stride(0);
      gr.gate = g.const_data_ptr<float>();
      gr.dlogits = dlogits.data_ptr<float>();
      bool aligned = can_vectorize(a, {{gr.dout, gr.dout_stride}});
      for (int64_t m = 0; m < M; ++m) {
        gr.df[m] = grad_features[m].data_ptr<scalar_t>();
        gr.dv[m] = values.empty() ? nullptr : grad_values[m].data_ptr<scalar_t>();
        aligned = aligned && reinterpret_cast<uintptr_t>(gr.df[m]) % 16 == 0 &&
                  (gr.dv[m] == nullptr || reinterpret_cast<uintptr_t>(gr.dv[m]) % 16 == 0);
      }
      constexpr int vec = 16 / sizeof(scalar_t);
      const dim3 grid(grid_for(rows)), block(kWarp * kWarpsPerBlock);
      if (aligned) {
        fusion_backward_kernel<scalar_t, vec><<<grid, block, 0, stream>>>(a, gr);
      } else {
        fusion_backward_kernel<scalar_t, 1><<<grid, block, 0, stream>>>(a, gr);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto [grad_weight, grad_bias] = fusion_weight_grad(dlogits, features, weight);
  return {grad_features, grad_weight, grad_bias, grad_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  m.impl("native_concat_weighted_fusion", &concat_weighted_fusion_cuda);
  m.impl("native_concat_weighted_fusion_backward", &concat_weighted_fusion_backward_cuda);
}

}  // namespace mmkernels
