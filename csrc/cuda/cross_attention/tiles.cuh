// What the forward and backward kernels share: the shared-memory tile loaders, the software
// pipeline, the two warp-level GEMM shapes every step of FlashAttention is made of, which keys
// each query row sees, and which queries a CTA or warp owns.
//
// Visibility. Row i of batch b sees keys j with lo <= j < hi (kv_start/kv_end, kv_lengths and the
// causal rule folded into one range) that key_padding_mask leaves. A CTA stages its rows' ranges
// in shared memory and walks only the key tiles (kKeyTile keys, aligned) that some row sees;
// before a tile is loaded, prepare_tile marks which of its keys any row sees, and only those are
// copied (the rest are zero-filled), so keys no row of the block sees never reach a product,
// whatever they hold. A key that one row sees and another does not must hold finite values:
// the hidden row's exact 0 probability would otherwise meet them inside the MMA.
//
// Shared-memory tiles are row-major with D elements per row, and the 16-byte chunks of row r are
// permuted by XOR with r % 8 (tile_index): the eight rows an ldmatrix reads at one column land in
// eight different bank groups, with no padding. (Padding rows by 16 bytes did the same but pushed
// the hd128 kernels past the 101,376 B of shared memory a block may use on sm_86 and sm_89.)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../../limits.h"
#include "../../philox.h"
#include "mma.cuh"
#include "params.h"

namespace mmkernels::attention {

constexpr int kWarpSize = 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Element (row, col) of a swizzled tile with kCols elements per row (col % 8 is kept, so a 16-byte
// chunk stays whole).
template <int kCols>
__device__ __forceinline__ int tile_index(int row, int col) {
  static_assert(kCols % 64 == 0, "eight 16-byte chunks per swizzle period");
  return row * kCols + ((((col >> 3) ^ (row & 7)) << 3) | (col & 7));
}

// Rows [0, kRows) of a tile of D-wide rows: rows < valid are copied asynchronously from
// `g` (row stride in elements), the rest are zero-filled. valid >= 1, so `g` is always mapped.
template <typename T, int kRows, int D, int kThreads>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t row_stride, int valid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = r < valid;
    cp_async_16(s + tile_index<D>(r, col), ok ? g + r * row_stride + col : g, ok);
  }
}

// Key tile `tile` (kKeys keys, aligned) of k and v, one (batch, kv head), into K/V buffer `buf`:
// the keys need[] marks are copied, the others zero-filled.
template <typename T, int kKeys, int D, int kThreads>
__device__ __forceinline__ void load_kv_tile(T* sK, T* sV, const T* k, const T* v, const Params& p, int tile, int buf,
                                             const uint8_t* need) {
  constexpr int kTileElems = kKeys * D;
  constexpr int kChunks = D / 8;
  const int64_t j0 = int64_t(tile) * kKeys;
  for (int c = threadIdx.x; c < kKeys * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = need[r];
    const int64_t kr = ok ? (j0 + r) * p.k.sl + col : 0, vr = ok ? (j0 + r) * p.v.sl + col : 0;
    cp_async_16(sK + buf * kTileElems + tile_index<D>(r, col), k + kr, ok);
    cp_async_16(sV + buf * kTileElems + tile_index<D>(r, col), v + vr, ok);
  }
}

// acc (kFrags x 16 x N) += A * B^T. A: the kFrags 16-row blocks of a swizzled tile `a` starting at
// row a_row0 (this warp's rows); B: N x K, the swizzled tile `b`; both K columns wide. Each B
// fragment is read once for all of the warp's A blocks: a warp that owns 32 rows reads K and V
// half as often per MMA as one that owns 16. Q K^T, K Q^T, V dO^T and dO V^T all have this shape.
template <typename T, int K, int N, int kFrags>
__device__ __forceinline__ void mma_a_bt(float (&acc)[kFrags][N / 8][4], const T* a, int a_row0, const T* b, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t af[kFrags][4];
#pragma unroll
    for (int f = 0; f < kFrags; ++f) {
      ldmatrix_x4(af[f], a + tile_index<K>(a_row0 + f * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
    }
#pragma unroll
    for (int nb = 0; nb < N / 16; ++nb) {
      uint32_t bf[4];  // rows nb*16 + 0..7, then + 8..15; each as k 0..7 and k 8..15
      ldmatrix_x4(bf, b + tile_index<K>(nb * 16 + (lane >> 4) * 8 + (lane & 7), kk * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
      for (int f = 0; f < kFrags; ++f) {
        mma_16816<T>(acc[f][2 * nb], af[f], bf[0], bf[1]);
        mma_16816<T>(acc[f][2 * nb + 1], af[f], bf[2], bf[3]);
      }
    }
  }
}

// acc (kFrags x 16 x N) += P * B: P is kFrags x 16 x K in fp32 accumulators (rounded to T on the
// way), B is K x N, the swizzled tile `b`, read transposed by ldmatrix once for all of P's blocks.
// P V, P^T dO, dS^T Q and dS K.
template <typename T, int K, int N, int kFrags>
__device__ __forceinline__ void mma_p_b(float (&acc)[kFrags][N / 8][4], const float (&p)[kFrags][K / 8][4], const T* b,
                                        int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t af[kFrags][4];
#pragma unroll
    for (int f = 0; f < kFrags; ++f) accumulators_as_a<T>(af[f], p[f][2 * kk], p[f][2 * kk + 1]);
#pragma unroll
    for (int nb = 0; nb < N / 16; ++nb) {
      uint32_t bf[4];  // k 0..7 and 8..15 of columns nb*16 + 0..7, then of + 8..15
      ldmatrix_x4_trans(bf, b + tile_index<N>(kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7), nb * 16 + (lane >> 4) * 8));
#pragma unroll
      for (int f = 0; f < kFrags; ++f) {
        mma_16816<T>(acc[f][2 * nb], af[f], bf[0], bf[1]);
        mma_16816<T>(acc[f][2 * nb + 1], af[f], bf[2], bf[3]);
      }
    }
  }
}

template <int F, int N>
__device__ __forceinline__ void zero(float (&acc)[F][N][4]) {
#pragma unroll
  for (int f = 0; f < F; ++f) {
#pragma unroll
    for (int i = 0; i < N; ++i) acc[f][i][0] = acc[f][i][1] = acc[f][i][2] = acc[f][i][3] = 0.f;
  }
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

__device__ __forceinline__ int clamp_index(int64_t x, int limit) {
  return x < 0 ? 0 : (x > limit ? limit : static_cast<int>(x));
}

__device__ __forceinline__ int clamp_length(const int64_t* lengths, int b, int limit) {
  return lengths == nullptr ? limit : clamp_index(lengths[b], limit);
}

__device__ __forceinline__ bool key_masked(const Params& p, int b, int j) {
  return p.mask != nullptr && p.mask[b * p.mask_sb + j * p.mask_sk];
}

// The keys row i of batch b may see, [lo, hi) (less those the mask hides); empty: lo = hi = 0.
// The caller excludes padded rows (q_lengths).
struct RowRange {
  int lo, hi;
};

__device__ __forceinline__ RowRange row_range(const Params& p, int b, int i) {
  const int64_t row = int64_t(b) * p.Lq + i;
  const int lo = p.kv_start != nullptr ? clamp_index(p.kv_start[row], p.Lk) : 0;
  int hi = p.kv_end != nullptr ? clamp_index(p.kv_end[row], p.Lk) : p.Lk;
  hi = min(hi, clamp_length(p.kv_lengths, b, p.Lk));
  if (p.causal) hi = min(hi, i + 1 + p.Lk - p.Lq);
  return hi > lo ? RowRange{lo, hi} : RowRange{0, 0};
}

// What the rows of a block see together: the union [first, last) of their ranges (empty when
// last <= first), and [max_lo, min_hi), which every row that sees anything sees.
struct Span {
  int first, last, max_lo, min_hi;
};

// Writes the ranges of rows row0 .. row0 + kRows - 1 of batch b to sLo/sHi (rows >= `valid` are
// padding: empty) and returns their span. Has a barrier.
template <int kRows, int kThreads>
__device__ __forceinline__ Span stage_rows(const Params& p, int b, int row0, int valid, int* sLo, int* sHi) {
  for (int r = threadIdx.x; r < kRows; r += kThreads) {
    const RowRange rr = r < valid ? row_range(p, b, row0 + r) : RowRange{0, 0};
    sLo[r] = rr.lo;
    sHi[r] = rr.hi;
  }
  __syncthreads();
  Span s{p.Lk, 0, 0, p.Lk};
  for (int r = 0; r < kRows; ++r) {
    if (sHi[r] <= sLo[r]) continue;
    s.first = min(s.first, sLo[r]);
    s.last = max(s.last, sHi[r]);
    s.max_lo = max(s.max_lo, sLo[r]);
    s.min_hi = min(s.min_hi, sHi[r]);
  }
  return s;
}

// Marks in need[t] whether some row of the block (ranges in sLo/sHi, kRows of them) sees key
// tile * kKeyTile + t, and returns whether any does. Called by the whole CTA (it has a barrier).
template <int kRows>
__device__ __forceinline__ bool prepare_tile(const Params& p, int b, int tile, const Span& span, const int* sLo,
                                             const int* sHi, uint8_t* need) {
  const int j0 = tile * kKeyTile;
  const bool whole = span.max_lo <= j0 && span.min_hi >= j0 + kKeyTile;  // no row needs testing
  int any = 0;
  for (int t = threadIdx.x; t < kKeyTile; t += blockDim.x) {
    const int j = j0 + t;
    bool seen = j >= span.first && j < span.last && !key_masked(p, b, j);
    if (seen && !whole) {
      seen = false;
      for (int r = 0; r < kRows && !seen; ++r) seen = sLo[r] <= j && j < sHi[r];
    }
    need[t] = seen;
    any |= seen;
  }
  return __syncthreads_or(any) != 0;
}

// Rows [0, kRows) of the key block starting at key0 (row stride in elements): keys that
// kv_lengths and the mask leave are copied, the others zero-filled.
template <typename T, int kRows, int D, int kThreads>
__device__ __forceinline__ void load_keys(T* s, const T* g, int64_t row_stride, const Params& p, int b, int key0,
                                          int n_keys) {
  constexpr int kChunks = D / 8;
  for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const int j = key0 + r;
    const bool ok = j < n_keys && !key_masked(p, b, j);
    cp_async_16(s + tile_index<D>(r, col), ok ? g + r * row_stride + col : g, ok);
  }
}

// Whether a (row, key) pair of a tile is visible: the key is one some row needs, the row sees
// anything at all, and the key is inside the row's range (always, in a whole tile).
__device__ __forceinline__ bool pair_visible(bool needed, const RowRange& r, int j, bool whole) {
  return needed && r.hi > r.lo && (whole || (j >= r.lo && j < r.hi));
}

// Scores of keys a row does not see become -inf (keys are the columns j0 .. j0 + N - 1 of a
// 16 x N tile; this thread's rows are `rows`), and seen[] records whether a row saw any.
template <int N>
__device__ __forceinline__ void hide_scores(float (&s)[N / 8][4], const uint8_t* need, int j0, bool whole,
                                            const RowRange (&rows)[2], bool (&seen)[2], int lane) {
  const int quad = lane % 4;
#pragma unroll
  for (int nb = 0; nb < N / 8; ++nb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t = nb * 8 + 2 * quad + (e & 1);
      if (pair_visible(need[t], rows[e / 2], j0 + t, whole)) {
        seen[e / 2] = true;
      } else {
        s[nb][e] = -INFINITY;
      }
    }
  }
}

// Attention dropout on a 16 x N tile of probabilities whose rows are query rows `row` (their
// (b * Hq + h) * Lq + i index, this thread's two) and columns keys j0 + column: kept ones are
// scaled by 1 / (1 - p), dropped ones become 0 (csrc/philox.h draws the same numbers everywhere).
// A Philox call gives the draws of four consecutive keys of one row; this thread holds two of
// them for each of its two rows, and its neighbour (lane ^ 1) the other two. So each of the pair
// makes one call, for its own row (even lanes the first, odd lanes the second), and they trade
// the halves: every output of every call is used.
template <int N>
__device__ __forceinline__ void drop_rows(float (&s)[N / 8][4], const Params& p, uint64_t seed, const int64_t (&row)[2],
                                          int j0, int lane) {
  const int quad = lane % 4, odd = quad & 1;
#pragma unroll
  for (int nb = 0; nb < N / 8; ++nb) {
    const int group4 = (j0 + nb * 8) / 4 + quad / 2;  // j0 is a multiple of 8
    const Philox4 x = philox4x32(static_cast<uint64_t>(row[odd]), static_cast<uint32_t>(group4), seed);
    // Even lanes need outputs 0, 1 of both rows; odd lanes 2, 3. Each sends what the other needs.
    const uint32_t got0 = __shfl_xor_sync(0xffffffffu, odd ? x.x[0] : x.x[2], 1);
    const uint32_t got1 = __shfl_xor_sync(0xffffffffu, odd ? x.x[1] : x.x[3], 1);
    const uint32_t first[2] = {odd ? got0 : x.x[0], odd ? got1 : x.x[1]};   // row[0]
    const uint32_t second[2] = {odd ? x.x[2] : got0, odd ? x.x[3] : got1};  // row[1]
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      s[nb][e] = first[e] >= p.dropout_threshold ? s[nb][e] * p.keep_scale : 0.f;
      s[nb][2 + e] = second[e] >= p.dropout_threshold ? s[nb][2 + e] * p.keep_scale : 0.f;
    }
  }
}

// The queries a CTA of the forward or dQ kernel owns: kBlockM rows of one (batch, query head).
struct QueryBlock {
  int b, h, hk;  // batch, query head, its kv head (GQA)
  int row0;      // first query row
  int rows;      // rows inside Lq
  int valid;     // rows that are not padding (q_lengths)
};

// Query block `index` of blockIdx.y's head and blockIdx.z's batch. With causal masking the last
// blocks see the most keys: they are handed out first, so that the heaviest do not form the tail.
template <int kBlockM>
__device__ __forceinline__ QueryBlock query_block(const Params& p, int index) {
  QueryBlock q;
  q.b = blockIdx.z;
  q.h = blockIdx.y;
  q.hk = q.h / (p.Hq / p.Hkv);
  if (p.causal) index = (p.Lq + kBlockM - 1) / kBlockM - 1 - index;
  q.row0 = index * kBlockM;
  q.rows = min(kBlockM, p.Lq - q.row0);
  q.valid = max(0, min(q.rows, clamp_length(p.q_lengths, q.b, p.Lq) - q.row0));
  return q;
}

// The software pipeline of every kernel here, over the steps in [begin, end) that prepare(step,
// buffer) keeps (it may have barriers; every thread calls it alike): the next kept step's copies
// (load(step, buffer)) are in flight while body(step, buffer) runs. Copies issued before the call
// join the first kept step's group.
template <typename Prepare, typename Load, typename Body>
__device__ __forceinline__ void pipeline(int begin, int end, Prepare&& prepare, Load&& load, Body&& body) {
  int cur = begin;
  while (cur < end && !prepare(cur, 0)) ++cur;
  if (cur >= end) {
    cp_async_commit();
    cp_async_wait<0>();  // copies issued before the call, if any
    return;
  }
  load(cur, 0);
  cp_async_commit();
  for (int buf = 0;; buf ^= 1) {
    int next = cur + 1;
    while (next < end && !prepare(next, buf ^ 1)) ++next;
    if (next < end) {
      load(next, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    body(cur, buf);
    __syncthreads();  // the next step refills this buffer
    if (next >= end) break;
    cur = next;
  }
}

// Zeroes rows [0, rows) of a D-wide row-major region in global memory (16-byte stores).
template <typename T, int D, int kThreads>
__device__ __forceinline__ void zero_rows(T* g, int64_t row_stride, int rows) {
  constexpr int kPer = 16 / sizeof(T), kChunks = D / kPer;
  for (int c = threadIdx.x; c < rows * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * kPer;
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
// needs the opt-in, which is per kernel and cheap to repeat) and checks the launch. The host
// refuses a GPU whose blocks may not use that much (cross_attention.cu) before it gets here.
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
