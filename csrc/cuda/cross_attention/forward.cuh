// FlashAttention-2 forward on tensor cores (mma.sync, sm_80+).
//
// One CTA per (block of kBlockM queries, query head, batch); each of its warps owns kFrags blocks
// of 16 query rows (FlashAttention-2's 128 x 64 tile with 4 warps: 32 rows each, so every K and
// V fragment read from shared memory feeds two MMAs, and K/V are re-read from L2 once per 128
// queries). The Q tile stays in shared memory; K/V tiles of kBlockN keys stream through two
// shared buffers with cp.async, the next tile in flight while the current one is used. Scores
// and the online softmax (fp32, base 2) stay in registers, and the probabilities feed the P V
// MMA from registers. Only the key tiles some row of the block sees are loaded (tiles.cuh:
// ranges, kv_lengths, causal, key_padding_mask); a GQA query head reads its kv head in place.
// When there are too few query blocks to fill the GPU, the host splits each block's key tiles
// among kv_splits CTAs, and combine_kernel merges their partial results by their log-sum-exp
// (flash-decoding).
#pragma once

#include <cfloat>

#include "tiles.cuh"

namespace mmkernels::attention {

template <int D>
struct ForwardConfig {
  static constexpr limits::CudaAttentionTile kTile = limits::cuda_attention_tile(limits::kCudaForward, D);
  static constexpr int kWarps = kTile.warps;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kFrags = kBlockM / (16 * kWarps);  // 16-row blocks per warp
  static_assert(kBlockM == kForwardBlockM && kBlockN == kForwardBlockN, "params.h's tile is the kernel's");
  static_assert(kFrags * 16 * kWarps == kBlockM, "each warp owns whole 16-row blocks");
  // Q, then two K buffers and two V buffers, all 2-byte elements; then the rows' key ranges
  // and the needed-key flags of the two buffers.
  static constexpr int kTileBytes = (kBlockM + 4 * kBlockN) * D * 2;
  static constexpr int kSmemBytes = kTileBytes + 2 * kBlockM * 4 + 2 * kBlockN;
  static_assert(kTile.stages == 2 && kSmemBytes == kTile.shared_bytes, "mmkernels/limits.py CUDA_ATTENTION_TILES");
};

// One step of the online softmax over a 16 x N tile of scaled base-2 scores (this thread's rows
// group and group + 8): s becomes exp2(s - new max), and o and l are rescaled to the new max.
// l is this thread's share of the row sum; the four lanes of a row add theirs up at the end.
template <int N, int D>
__device__ __forceinline__ void online_softmax(float (&s)[N / 8][4], float (&o)[D / 8][4], float (&m)[2],
                                               float (&l)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = m[r];
#pragma unroll
    for (int nb = 0; nb < N / 8; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * r], s[nb][2 * r + 1]));
    mx = quad_max(mx);
    // A row that has seen only hidden keys keeps m = -inf; subtracting 0 then keeps exp2 at 0
    // instead of exp2(-inf + inf) = NaN.
    const float base = mx == -INFINITY ? 0.f : mx;
    const float correction = exp2f(m[r] - base);
    m[r] = mx;
    l[r] *= correction;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      o[nd][2 * r] *= correction;
      o[nd][2 * r + 1] *= correction;
    }
#pragma unroll
    for (int nb = 0; nb < N / 8; ++nb) {
      s[nb][2 * r] = exp2f(s[nb][2 * r] - base);
      s[nb][2 * r + 1] = exp2f(s[nb][2 * r + 1] - base);
      l[r] += s[nb][2 * r] + s[nb][2 * r + 1];
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(ForwardConfig<D>::kThreads, 1) forward_kernel(const Params p) {
  using C = ForwardConfig<D>;
  constexpr int F = C::kFrags;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + C::kBlockM * D;      // two buffers of kBlockN rows
  T* sV = sK + 2 * C::kBlockN * D;  // two buffers
  int* sLo = reinterpret_cast<int*>(smem + C::kTileBytes);
  int* sHi = sLo + C::kBlockM;
  uint8_t* sNeed = reinterpret_cast<uint8_t*>(sHi + C::kBlockM);  // two buffers of kBlockN flags

  const QueryBlock blk = query_block<C::kBlockM>(p, blockIdx.x / p.kv_splits);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, group = lane / 4;
  const Span span = stage_rows<C::kBlockM, C::kThreads>(p, blk.b, blk.row0, blk.valid, sLo, sHi);
  // This CTA's share of the key tiles its rows see: all of them, or split `split` of kv_splits.
  const int split = blockIdx.x % p.kv_splits;
  const int tile0 = span.first / C::kBlockN, tiles = span.last > span.first ? (span.last + C::kBlockN - 1) / C::kBlockN - tile0 : 0;
  const int per_split = (tiles + p.kv_splits - 1) / p.kv_splits;
  const int first = tile0 + split * per_split, last = tile0 + min(tiles, (split + 1) * per_split);
  const bool partial = p.kv_splits > 1;

  const int64_t stats = (static_cast<int64_t>(blk.b) * p.Hq + blk.h) * p.Lq + blk.row0;
  const int64_t plane = static_cast<int64_t>(p.B) * p.Hq * p.Lq;  // rows of one split's partials
  float* lse = partial ? p.partial_lse + split * plane + stats : p.lse + stats;
  T* out = p.out.rows<T>(blk.b, blk.h) + blk.row0 * p.out.sl;

  const T* k = p.k.rows<T>(blk.b, blk.hk);
  const T* v = p.v.rows<T>(blk.b, blk.hk);
  auto prepare = [&](int tile, int buf) {
    return prepare_tile<C::kBlockM>(p, blk.b, tile, span, sLo, sHi, sNeed + buf * C::kBlockN);
  };
  auto load_kv = [&](int tile, int buf) {
    load_kv_tile<T, C::kBlockN, D, C::kThreads>(sK, sV, k, v, p, tile, buf, sNeed + buf * C::kBlockN);
  };
  if (blk.valid > 0 && first < last) {
    load_tile<T, C::kBlockM, D, C::kThreads>(sQ, p.q.rows<T>(blk.b, blk.h) + blk.row0 * p.q.sl, p.q.sl, blk.valid);
  }

  // This warp owns rows warp * 16 * F .. + 16 * F; fragment f, rows f * 16 + group (+ 8) of them.
  const int warp_row0 = warp * 16 * F;
  RowRange rows[F][2];
  int64_t drop_row[F][2];
#pragma unroll
  for (int f = 0; f < F; ++f) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row0 + f * 16 + group + 8 * r;
      rows[f][r] = {sLo[row], sHi[row]};
      drop_row[f][r] = stats + row;
    }
  }
  const uint64_t seed = p.seed != nullptr ? static_cast<uint64_t>(*p.seed) : 0;
  const float scale_log2 = p.scale * kLog2e;
  float o[F][D / 8][4];
  zero(o);
  float m[F][2], l[F][2];  // running row max (base-2 units) and this thread's share of the row sum
  bool seen[F][2];         // the row saw a visible key
#pragma unroll
  for (int f = 0; f < F; ++f) m[f][0] = m[f][1] = -INFINITY, l[f][0] = l[f][1] = 0.f, seen[f][0] = seen[f][1] = false;

  pipeline(blk.valid > 0 ? first : last, last, prepare, load_kv, [&](int tile, int buf) {
    const int j0 = tile * C::kBlockN;
    const bool whole = span.max_lo <= j0 && span.min_hi >= j0 + C::kBlockN;
    float s[F][C::kBlockN / 8][4];
    zero(s);
    mma_a_bt<T, D, C::kBlockN, F>(s, sQ, warp_row0, sK + buf * C::kBlockN * D, lane);
#pragma unroll
    for (int f = 0; f < F; ++f) {
      scale_all(s[f], scale_log2);  // before hiding keys, so that any scale leaves -inf as it is
      hide_scores<C::kBlockN>(s[f], sNeed + buf * C::kBlockN, j0, whole, rows[f], seen[f], lane);
      online_softmax<C::kBlockN, D>(s[f], o[f], m[f], l[f]);
      if (p.seed != nullptr) drop_rows<C::kBlockN>(s[f], p, seed, drop_row[f], j0, lane);
    }
    mma_p_b<T, C::kBlockN, D, F>(o, s, sV + buf * C::kBlockN * D, lane);
  });

#pragma unroll
  for (int f = 0; f < F; ++f) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(l[f][r]);
      const bool any = quad_max(seen[f][r] ? 1.f : 0.f) > 0.f;
      const int row = warp_row0 + f * 16 + group + 8 * r;
      // No visible key, or a padded query: exactly 0, whatever the hidden values held. Visible keys
      // whose scores all overflowed to -inf: NaN, never a silent 0. A NaN sum stays NaN.
      const bool empty = !any;
      const bool overflow = any && sum == 0.f;
      if (empty || overflow) zero_row(o[f], r);
      // A split's partials mark an overflowed row with lse -FLT_MAX: it merges as nothing next to
      // another split's keys, and makes the row NaN if no split has any (combine_kernel).
      inv[r] = empty ? 0.f : (overflow ? (partial ? 0.f : NAN) : 1.f / sum);
      const float empty_lse = partial ? -INFINITY : INFINITY;
      const float overflow_lse = partial ? -FLT_MAX : -INFINITY;
      if (lane % 4 == 0 && row < blk.rows) {
        lse[row] = empty ? empty_lse : (overflow ? overflow_lse : (m[f][r] + log2f(sum)) * kLn2);
      }
    }
    if (!partial) {
      store_rows<T, D>(out, p.out.sl, o[f], warp_row0 + f * 16, blk.rows, inv, lane);
      continue;
    }
    float* part = p.partial_out + (split * plane + stats) * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row0 + f * 16 + group + 8 * r;
      if (row >= blk.rows) continue;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        *reinterpret_cast<float2*>(part + row * D + nd * 8 + 2 * (lane % 4)) =
            make_float2(o[f][nd][2 * r] * inv[r], o[f][nd][2 * r + 1] * inv[r]);
      }
    }
  }
}

// Merges the kv_splits partial results of every query row: lse = log sum_s exp(lse_s) and
// out = sum_s exp(lse_s - lse) out_s. One warp per row; splits with no key (-inf) are skipped,
// a row with none at all is 0 with lse +inf, a row whose splits saw keys but only overflowed
// scores (-FLT_MAX) is NaN with lse -inf, and a NaN lse_s makes the row NaN.
template <typename T, int D>
__global__ void combine_kernel(const Params p) {
  const QueryRow row = query_row(p);
  if (row.index < 0) return;  // the same for the whole warp
  const int lane = threadIdx.x % kWarpSize;
  const int64_t plane = static_cast<int64_t>(p.B) * p.Hq * p.Lq;
  float mx = -INFINITY;
  for (int s = 0; s < p.kv_splits; ++s) {
    const float x = p.partial_lse[s * plane + row.index];
    mx = (x > mx || x != x) ? x : mx;
  }
  T* out = p.out.rows<T>(row.b, row.h) + row.i * p.out.sl;
  constexpr int kPerLane = D / kWarpSize;  // 2 or 4 consecutive pairs of columns
  float acc[kPerLane] = {};
  float total = 0.f;
  if (mx != -INFINITY && mx != -FLT_MAX) {
    for (int s = 0; s < p.kv_splits; ++s) {
      const float x = p.partial_lse[s * plane + row.index];
      if (x == -INFINITY) continue;
      const float w = expf(x - mx);
      total += w;
      const float* part = p.partial_out + (s * plane + row.index) * D;
#pragma unroll
      for (int c = 0; c < kPerLane; c += 2) {
        const float2 y = *reinterpret_cast<const float2*>(part + c * kWarpSize + 2 * lane);
        acc[c] += w * y.x;
        acc[c + 1] += w * y.y;
      }
    }
  }
  const bool overflow = mx == -FLT_MAX;
  const float inv = overflow ? NAN : (total == 0.f ? 0.f : 1.f / total);
#pragma unroll
  for (int c = 0; c < kPerLane; c += 2) {
    *reinterpret_cast<uint32_t*>(out + c * kWarpSize + 2 * lane) = pack2<T>(acc[c] * inv, acc[c + 1] * inv);
  }
  if (lane == 0) p.lse[row.index] = overflow ? -INFINITY : (total == 0.f ? INFINITY : mx + logf(total));
}

template <typename T, int D>
void run_forward(const Params& p, cudaStream_t stream) {
  using C = ForwardConfig<D>;
  if (p.B == 0 || p.Hq == 0 || p.Lq == 0) return;  // nothing to write (the host fills empty keys itself)
  launch(forward_kernel<T, D>, dim3((p.Lq + C::kBlockM - 1) / C::kBlockM * p.kv_splits, p.Hq, p.B), C::kThreads,
         C::kSmemBytes, stream, p);
  if (p.kv_splits > 1) launch_per_row(combine_kernel<T, D>, p, stream);
}

}  // namespace mmkernels::attention
