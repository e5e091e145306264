// Fragment helpers around the tensor-core instructions of ptx.cuh (cp.async, ldmatrix,
// mma.sync.m16n8k16 with fp32 accumulation).
//
// Fragment layouts are those of the PTX ISA ("Matrix fragments for mma.m16n8k16"). With
// lane = 4 * group + quad, a 16x8 fp32 accumulator c[4] holds rows `group` (c[0], c[1]) and
// `group + 8` (c[2], c[3]), columns 2 * quad and 2 * quad + 1. Two accumulators side by side
// (16x16) have exactly the layout of a 16x16 A operand, which is how probabilities computed in
// registers feed the next MMA without a trip through shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#ifndef MMKERNELS_EMULATE_GPU  // else csrc/test/gpu_emulator.h, included first, provides these
#include "ptx.cuh"
#endif

namespace mmkernels::attention {

// Two floats rounded to T and packed into one register, `lo` in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t x);

template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t x) {
  return __half22float2(*reinterpret_cast<const __half2*>(&x));
}

template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t x) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x));
}

// The A operand for a 16x16 C tile held as two 16x8 accumulators (columns 0-7, then 8-15).
template <typename T>
__device__ __forceinline__ void accumulators_as_a(uint32_t (&a)[4], const float (&left)[4], const float (&right)[4]) {
  a[0] = pack2<T>(left[0], left[1]);
  a[1] = pack2<T>(left[2], left[3]);
  a[2] = pack2<T>(right[0], right[1]);
  a[3] = pack2<T>(right[2], right[3]);
}

// The four lanes of a group hold one accumulator row between them.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace mmkernels::attention
