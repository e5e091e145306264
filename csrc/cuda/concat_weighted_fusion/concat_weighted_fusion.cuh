// The device code of the CUDA concat-weighted fusion: one warp per row (grid-stride), fp32
// accumulation. Forward: each lane reads its slice of every modality's row once (VEC-wide
// accesses, 128-bit when widths, strides and pointers allow), accumulates all M gate logits, a
// warp reduction finishes them, every lane computes the same softmax, and the weighted
// sum/concat of the values is written once. Backward: the same row walk yields the per-row
// logit gradients and every feature/value gradient.
//
// The host side is concat_weighted_fusion.cu; csrc/test/test_fusion_emulated.cpp runs these
// kernels on the CPU.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../../limits.h"

namespace mmkernels::fusion {

using limits::kMaxModalities;  // mmkernels/limits.py MAX_MODALITIES
constexpr int kWarp = 32;

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

}  // namespace mmkernels::fusion
