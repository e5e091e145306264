// What the forward and backward kernels share: the shared-memory tile loaders, the software
// pipeline, the two warp-level GEMM shapes every step of FlashAttention is made of, key
// visibility, and which queries a CTA or warp owns.
//
// Shared-memory tiles are row-major with D + kPad elements per row: the 16 bytes of padding
// shift consecutive rows by one bank group, so the eight row addresses of an ldmatrix land in
// different banks.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "mma.cuh"
#include "params.h"

namespace mmkernels::attention {

constexpr int kPad = 8;
constexpr int kWarpSize = 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Rows [0, kRows) of a tile of D-wide rows: rows < valid are copied asynchronously from
// `g` (row stride in elements), the rest are zero-filled. valid >= 1, so `g` is always mapped.
template <typename T, int kRows, int D, int kThreads>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t row_stride, int valid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = r < valid;
    cp_async_16(s + r * (D + kPad) + col, ok ? g + r * row_stride + col : g, ok);
  }
}

// Key tile `tile` (kKeys keys) of k and v, one (batch, kv head), into K/V buffer `buf`.
template <typename T, int kKeys, int D, int kThreads>
__device__ __forceinline__ void load_kv_tile(T* sK, T* sV, const T* k, const T* v, const Params& p, int n_keys,
                                             int tile, int buf) {
  constexpr int kTileElems = kKeys * (D + kPad);
  const int j0 = tile * kKeys, n = min(kKeys, n_keys - j0);
  load_tile<T, kKeys, D, kThreads>(sK + buf * kTileElems, k + j0 * p.k.sl, p.k.sl, n);
  load_tile<T, kKeys, D, kThreads>(sV + buf * kTileElems, v + j0 * p.v.sl, p.v.sl, n);
}

// acc (16 x N) += A * B^T: A is the 16 x K block of a shared tile at `a` (this warp's rows),
// B is N x K, row-major at `b`. Q K^T, K Q^T, V dO^T and dO V^T all have this shape.
template <typename T, int K, int N, int kLd>
__device__ __forceinline__ void mma_a_bt(float (&acc)[N / 8][4], const T* a, const T* b, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t af[4];
    ldmatrix_x4(af, a + (lane & 15) * kLd + kk * 16 + (lane >> 4) * 8);
#pragma unroll
    for (int nb = 0; nb < N / 16; ++nb) {
      uint32_t bf[4];  // rows nb*16 + 0..7, then + 8..15; each as k 0..7 and k 8..15
      ldmatrix_x4(bf, b + (nb * 16 + (lane >> 4) * 8 + (lane & 7)) * kLd + kk * 16 + ((lane >> 3) & 1) * 8);
      mma_16816<T>(acc[2 * nb], af, bf[0], bf[1]);
      mma_16816<T>(acc[2 * nb + 1], af, bf[2], bf[3]);
    }
  }
}

// acc (16 x N) += P * B: P is 16 x K in fp32 accumulators (rounded to T on the way), B is
// K x N, row-major at `b`, read transposed by ldmatrix. P V, P^T dO, dS^T Q and dS K.
template <typename T, int K, int N, int kLd>
__device__ __forceinline__ void mma_p_b(float (&acc)[N / 8][4], const float (&p)[K / 8][4], const T* b, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t af[4];
    accumulators_as_a<T>(af, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
    for (int nb = 0; nb < N / 16; ++nb) {
      uint32_t bf[4];  // k 0..7 and 8..15 of columns nb*16 + 0..7, then of + 8..15
      ldmatrix_x4_trans(bf, b + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * kLd + nb * 16 + (lane >> 4) * 8);
      mma_16816<T>(acc[2 * nb], af, bf[0], bf[1]);
      mma_16816<T>(acc[2 * nb + 1], af, bf[2], bf[3]);
    }
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

template <int N>
__device__ __forceinline__ void scale_all(float (&acc)[N][4], float f) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] *= f;
  }
}

// Zeroes accumulator row r (0: group, 1: group + 8) of this thread.
template <int N>
__device__ __forceinline__ void zero_row(float (&acc)[N][4], int r) {
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i][2 * r] = acc[i][2 * r + 1] = 0.f;
}

__device__ __forceinline__ int clamp_length(const int64_t* lengths, int b, int limit) {
  if (lengths == nullptr) return limit;
  const int64_t n = lengths[b];
  return n < 0 ? 0 : (n > limit ? limit : static_cast<int>(n));
}

// Key j of batch b takes part: inside kv_lengths and not set in key_padding_mask.
template <bool kMask>
__device__ __forceinline__ bool key_visible(const Params& p, int b, int j, int n_keys) {
  if (j >= n_keys) return false;
  if constexpr (kMask) return !p.mask[b * p.mask_sb + j * p.mask_sk];
  return true;
}

// Scores (already scaled) of keys that take no part become -inf; keys are the columns
// j0 .. j0 + N - 1 of a 16 x N tile. Without a mask only a tile reaching past n_keys has any.
template <bool kMask, int N>
__device__ __forceinline__ void hide_key_columns(float (&s)[N / 8][4], const Params& p, int b, int j0, int n_keys,
                                                 int lane) {
  if (!kMask && j0 + N <= n_keys) return;
  const int quad = lane % 4;
#pragma unroll
  for (int nb = 0; nb < N / 8; ++nb) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (!key_visible<kMask>(p, b, j0 + nb * 8 + 2 * quad + e, n_keys)) s[nb][e] = s[nb][e + 2] = -INFINITY;
    }
  }
}

// The queries a CTA of the forward or dQ kernel owns: kBlockM rows of one (batch, query head).
struct QueryBlock {
  int b, h, hk;  // batch, query head, its kv head (GQA)
  int row0;      // first query row
  int rows;      // rows inside Lq
  int valid;     // rows that are not padding (q_lengths)
  int n_keys;    // keys inside kv_lengths
};

template <int kBlockM>
__device__ __forceinline__ QueryBlock query_block(const Params& p, int index) {
  QueryBlock q;
  q.b = blockIdx.z;
  q.h = blockIdx.y;
  q.hk = q.h / (p.Hq / p.Hkv);
  q.row0 = index * kBlockM;
  q.rows = min(kBlockM, p.Lq - q.row0);
  q.valid = max(0, min(q.rows, clamp_length(p.q_lengths, q.b, p.Lq) - q.row0));
  q.n_keys = clamp_length(p.kv_lengths, q.b, p.Lk);
  return q;
}

// The software pipeline of every kernel here: `steps` steps over two shared buffers. Step t + 1's
// copies (load(t + 1, buffer)) are in flight while body(t, buffer) runs. Copies issued before the
// call join step 0's group.
template <typename Load, typename Body>
__device__ __forceinline__ void pipeline(int steps, Load&& load, Body&& body) {
  load(0, 0);
  cp_async_commit();
  for (int t = 0; t < steps; ++t) {
    if (t + 1 < steps) {
      load(t + 1, (t + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    body(t, t & 1);
    __syncthreads();  // the next step refills this buffer
  }
}

// Zeroes rows [0, rows) of a D-wide row-major region in global memory (16-byte stores).
template <typename T, int D, int kThreads>
__device__ __forceinline__ void zero_rows(T* g, int64_t row_stride, int rows) {
  constexpr int kChunks = D / 8;
  for (int c = threadIdx.x; c < rows * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    *reinterpret_cast<uint4*>(g + r * row_stride + col) = make_uint4(0, 0, 0, 0);
  }
}

// Kernels with one warp per (batch, head, query) row launch kQueryRowsPerBlock rows per CTA
// (launch_per_row) and find theirs with query_row().
constexpr int kQueryRowsPerBlock = 8;

// One warp per (batch, head, query) row: its index, or -1 past the last row.
struct QueryRow {
  int64_t index;  // into (B, Hq, Lq)
  int b, h, i;
};

__device__ __forceinline__ QueryRow query_row(const Params& p) {
  QueryRow r;
  r.index = static_cast<int64_t>(blockIdx.x) * kQueryRowsPerBlock + threadIdx.x / kWarpSize;
  if (r.index >= static_cast<int64_t>(p.B) * p.Hq * p.Lq) r.index = -1;
  r.i = static_cast<int>(r.index % p.Lq);
  r.h = static_cast<int>(r.index / p.Lq % p.Hq);
  r.b = static_cast<int>(r.index / p.Lq / p.Hq);
  return r;
}

// Stores a warp's 16 x D fp32 accumulator rows times `row_scale` into rows row0 + group and
// row0 + group + 8 of a global tile; rows >= rows_in_bounds are not stored.
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* g, int64_t row_stride, const float (&acc)[D / 8][4], int row0,
                                           int rows_in_bounds, const float (&row_scale)[2], int lane) {
  const int group = lane / 4, quad = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + group + 8 * r;
    if (row >= rows_in_bounds) continue;
    T* dst = g + row * row_stride + quad * 2;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      *reinterpret_cast<uint32_t*>(dst + nd * 8) =
          pack2<T>(acc[nd][2 * r] * row_scale[r], acc[nd][2 * r + 1] * row_scale[r]);
    }
  }
}

#ifndef MMKERNELS_EMULATE_GPU  // the emulator brings its own launch()
}  // namespace mmkernels::attention

#include <c10/cuda/CUDAException.h>

namespace mmkernels::attention {

// Launches on `stream` with `smem_bytes` of dynamic shared memory (above the default 48 KiB
// needs the opt-in, which is per kernel and cheap to repeat) and checks the launch.
template <typename Kernel>
void launch(Kernel* kernel, dim3 grid, int threads, int smem_bytes, cudaStream_t stream, const Params& p) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  kernel<<<grid, threads, smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

template <typename Kernel>
void launch_per_row(Kernel* kernel, const Params& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Lq;
  launch(kernel, dim3(static_cast<unsigned>((rows + kQueryRowsPerBlock - 1) / kQueryRowsPerBlock)),
         kQueryRowsPerBlock * kWarpSize, 0, stream, p);
}

}  // namespace mmkernels::attention
