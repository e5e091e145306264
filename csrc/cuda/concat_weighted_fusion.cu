// CUDA concat-weighted fusion: one warp per row (grid-stride), fp32 accumulation.
//
// Forward: each lane reads its slice of every modality's row once (128-bit loads when widths,
// strides and pointers allow), accumulates all M gate logits, a warp reduction finishes them,
// every lane computes the same softmax, and the weighted sum/concat of the values is written
// once. Backward: the same row walk yields per-row logit gradients and every feature/value
// gradient; fusion_weight_grad reduces the weight gradient with cuBLAS, deterministically.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../common.h"
#include "../fusion_weight_grad.h"

namespace mmkernels {
namespace {

// fp32 accumulation throughout: float64 inputs are refused (the Python dispatch says so).
#define MMKERNELS_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

constexpr int kMaxModalities = 8;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

template <typename T>
struct FusionArgs {
  const T* f[kMaxModalities];
  int64_t f_stride[kMaxModalities];
  int d[kMaxModalities];
  int d_off[kMaxModalities];
  const T* v[kMaxModalities];
  int64_t v_stride[kMaxModalities];
  int e[kMaxModalities];
  int e_off[kMaxModalities];
  const T* w;  // M x sum(D), row stride w_ld
  int64_t w_ld;
  const T* bias;  // M or null
  int M;
  int64_t rows;
  bool concat;
};

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T x[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int t = 0; t < VEC; ++t) out[t] = static_cast<float>(pk.x[t]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int t = 0; t < VEC; ++t) pk.x[t] = static_cast<T>(in[t]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Softmax over modalities of the gate logits of row r; every lane ends with the same g.
template <typename T, int VEC>
__device__ void gate_row(const FusionArgs<T>& a, int64_t r, int lane, float (&g)[kMaxModalities]) {
#pragma unroll
  for (int k = 0; k < kMaxModalities; ++k) g[k] = 0.f;
  for (int m = 0; m < a.M; ++m) {
    const T* f = a.f[m] + r * a.f_stride[m];
    for (int i = lane * VEC; i < a.d[m]; i += kWarp * VEC) {
      float x[VEC];
      load<T, VEC>(f + i, x);
#pragma unroll
      for (int k = 0; k < kMaxModalities; ++k) {
        if (k >= a.M) break;
        float w[VEC];
        load<T, VEC>(a.w + k * a.w_ld + a.d_off[m] + i, w);
#pragma unroll
        for (int t = 0; t < VEC; ++t) g[k] += x[t] * w[t];
      }
    }
  }
  float mx = -INFINITY;
#pragma unroll
  for (int k = 0; k < kMaxModalities; ++k) {
    if (k >= a.M) break;
    g[k] = warp_sum(g[k]) + (a.bias ? static_cast<float>(a.bias[k]) : 0.f);
    mx = fmaxf(mx, g[k]);
  }
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kMaxModalities; ++k) {
    if (k >= a.M) break;
    g[k] = __expf(g[k] - mx);
    sum += g[k];
  }
#pragma unroll
  for (int k = 0; k < kMaxModalities; ++k) g[k] /= sum;
}

template <typename T, int VEC>
__global__ void fusion_forward_kernel(FusionArgs<T> a, T* out, int64_t out_stride, float* gate) {
  const int lane = threadIdx.x % kWarp;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t r = first; r < a.rows; r += step) {
    float g[kMaxModalities];
    gate_row<T, VEC>(a, r, lane, g);
    if (lane < a.M) gate[r * a.M + lane] = g[lane];
    T* o = out + r * out_stride;
    if (a.concat) {
      for (int m = 0; m < a.M; ++m) {
        const T* v = a.v[m] + r * a.v_stride[m];
        for (int i = lane * VEC; i < a.e[m]; i += kWarp * VEC) {
          float x[VEC];
          load<T, VEC>(v + i, x);
#pragma unroll
          for (int t = 0; t < VEC; ++t) x[t] *= g[m];
          store<T, VEC>(o + a.e_off[m] + i, x);
        }
      }
    } else {
      for (int i = lane * VEC; i < a.e[0]; i += kWarp * VEC) {
        float acc[VEC] = {};
        for (int m = 0; m < a.M; ++m) {
          float x[VEC];
          load<T, VEC>(a.v[m] + r * a.v_stride[m] + i, x);
#pragma unroll
          for (int t = 0; t < VEC; ++t) acc[t] += g[m] * x[t];
        }
        store<T, VEC>(o + i, acc);
      }
    }
  }
}

template <typename T>
struct FusionGrads {
  const T* dout;
  int64_t dout_stride;
  const float* gate;
  float* dlogits;  // rows x M
  T* df[kMaxModalities];
  T* dv[kMaxModalities];  // null when the values are the features
};

template <typename T, int VEC>
__global__ void fusion_backward_kernel(FusionArgs<T> a, FusionGrads<T> gr) {
  const int lane = threadIdx.x % kWarp;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const bool separate_values = gr.dv[0] != nullptr;
  for (int64_t r = first; r < a.rows; r += step) {
    const T* dout = gr.dout + r * gr.dout_stride;
    float g[kMaxModalities], dl[kMaxModalities];
    float weighted = 0.f;
    for (int m = 0; m < a.M; ++m) {
      g[m] = gr.gate[r * a.M + m];
      const T* v = a.v[m] + r * a.v_stride[m];
      const T* d = dout + (a.concat ? a.e_off[m] : 0);
      float part = 0.f;
      for (int i = lane * VEC; i < a.e[m]; i += kWarp * VEC) {
        float x[VEC], y[VEC];
        load<T, VEC>(v + i, x);
        load<T, VEC>(d + i, y);
#pragma unroll
        for (int t = 0; t < VEC; ++t) part += x[t] * y[t];
      }
      dl[m] = warp_sum(part);
      weighted += g[m] * dl[m];
    }
    for (int m = 0; m < a.M; ++m) dl[m] = g[m] * (dl[m] - weighted);
    if (lane < a.M) gr.dlogits[r * a.M + lane] = dl[lane];
    for (int m = 0; m < a.M; ++m) {
      const T* d = dout + (a.concat ? a.e_off[m] : 0);
      for (int i = lane * VEC; i < a.d[m]; i += kWarp * VEC) {
        float acc[VEC] = {};
        for (int k = 0; k < a.M; ++k) {
          float w[VEC];
          load<T, VEC>(a.w + k * a.w_ld + a.d_off[m] + i, w);
#pragma unroll
          for (int t = 0; t < VEC; ++t) acc[t] += dl[k] * w[t];
        }
        if (!separate_values) {
          float y[VEC];
          load<T, VEC>(d + i, y);
#pragma unroll
          for (int t = 0; t < VEC; ++t) acc[t] += g[m] * y[t];
        }
        store<T, VEC>(gr.df[m] + r * a.d[m] + i, acc);
      }
      if (separate_values) {
        for (int i = lane * VEC; i < a.e[m]; i += kWarp * VEC) {
          float y[VEC];
          load<T, VEC>(d + i, y);
#pragma unroll
          for (int t = 0; t < VEC; ++t) y[t] *= g[m];
          store<T, VEC>(gr.dv[m] + r * a.e[m] + i, y);
        }
      }
    }
  }
}

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
