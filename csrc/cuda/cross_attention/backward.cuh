// FlashAttention-2 backward on tensor cores (mma.sync, sm_80+), without atomics, so gradients
// are deterministic:
//   delta_kernel   delta = rowsum(dO * O), once per query row;
//   dkdv_kernel    one CTA per (block of kBlockN keys, kv head, batch) owns dK and dV of its keys
//                  and walks the query blocks of every query head in its GQA group; when those
//                  CTAs are too few to fill the GPU, the host splits the walk among dkdv_splits
//                  CTAs, which write fp32 partials that dkdv_reduce_kernel sums in a fixed order;
//   dq_kernel      one CTA per (block of queries, query head, batch) owns dQ, walking the keys.
// Both recompute the probabilities from the saved log-sum-exp: P = exp2(scale_log2 S - lse2).
// A probability of exactly 0 (a hidden key, a padded query, a row with no key) gives a dS of
// exactly 0, so hidden values never leak into a gradient as 0 * inf.
#pragma once

#include "tiles.cuh"

namespace mmkernels::attention {

template <int D>
struct BackwardConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  // dkdv_kernel: 16 keys per warp; query blocks of kBlockM per step, as many as the registers
  // hold next to dK and dV (ptxas -v: no spills, tools/compile_gpu.py --cuda).
  static constexpr limits::CudaAttentionTile kDkDvTile = limits::cuda_attention_tile(limits::kCudaDkDv, D);
  static constexpr int kBlockN = kDkDvTile.block_n;
  static constexpr int kBlockM = kDkDvTile.block_m;
  static_assert(kBlockN == 16 * kWarps && kBlockN == kKeyTile, "a dK/dV block is one key tile, 16 keys per warp");
  static_assert(kBlockM % 16 == 0 && kBlockM / 8 * 4 <= 32, "the dropout keep bits of a step fit one register");
  // K and V; Q and dO in two buffers each; then lse and delta, and the query rows' key ranges,
  // two buffers each.
  static constexpr int kDkDvTileBytes = (2 * kBlockN + 4 * kBlockM) * D * 2;
  static constexpr int kDkDvSmemBytes = kDkDvTileBytes + 2 * kBlockM * 4 * 4;
  static_assert(kDkDvTile.warps == kWarps && kDkDvTile.stages == 2 && kDkDvSmemBytes == kDkDvTile.shared_bytes,
                "mmkernels/limits.py CUDA_ATTENTION_TILES");
  // dq_kernel: 16 queries per warp, key tiles of kKeys.
  static constexpr limits::CudaAttentionTile kDqTile = limits::cuda_attention_tile(limits::kCudaDq, D);
  static constexpr int kQueries = kDqTile.block_m;
  static constexpr int kKeys = kDqTile.block_n;
  static_assert(kQueries == 16 * kWarps && kKeys == kKeyTile, "dq_kernel: 16 queries per warp over key tiles");
  // Q and dO; K and V in two buffers each; then the rows' key ranges and two buffers of
  // needed-key flags.
  static constexpr int kDqTileBytes = (2 * kQueries + 4 * kKeys) * D * 2;
  static constexpr int kDqSmemBytes = kDqTileBytes + 2 * kQueries * 4 + 2 * kKeys;
  static_assert(kDqTile.warps == kWarps && kDqTile.stages == 2 && kDqSmemBytes == kDqTile.shared_bytes,
                "mmkernels/limits.py CUDA_ATTENTION_TILES");
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in fp32; one warp per query row.
template <typename T, int D>
__global__ void delta_kernel(const Params p) {
  const QueryRow row = query_row(p);
  if (row.index < 0) return;  // the same for the whole warp
  const int lane = threadIdx.x % kWarpSize;
  const T* dout = p.dout.rows<T>(row.b, row.h) + row.i * p.dout.sl;
  const T* out = p.out.rows<T>(row.b, row.h) + row.i * p.out.sl;
  float acc = 0.f;
  for (int d = 2 * lane; d < D; d += 2 * kWarpSize) {
    const float2 x = unpack2<T>(*reinterpret_cast<const uint32_t*>(dout + d));
    const float2 y = unpack2<T>(*reinterpret_cast<const uint32_t*>(out + d));
    acc += x.x * y.x + x.y * y.y;
  }
  acc = warp_sum(acc);
  if (lane == 0) p.delta[row.index] = acc;
}

// dS = P (dP - delta), exactly 0 where P is 0 (a hidden key) or 1 (a saturated row has no
// gradient; delta - dP, one number rounded by two different sums, would be noise times the scale).
__device__ __forceinline__ float softmax_grad(float prob, float dprob, float delta) {
  return prob == 0.f || prob == 1.f ? 0.f : prob * (dprob - delta);
}

// Dropout's keep flags of a dK/dV step, one bit per element of this thread's 16 x kBlockM P^T
// tile (bit 4 nb + 2 r + e: key group + 8 r, query column nb * 8 + 2 quad + e). A Philox call
// draws four consecutive keys of one query row; the four lanes that hold them (group % 4 =
// 0..3, the same quad) each make one of the four calls their elements need, and pass the draws
// round in four shuffles: lane t sends output (t + k) % 4 of its call in round k, and takes from
// lane (t - k) % 4 its own key's draw. Every output of every call is used.
template <int kBlockM>
__device__ __forceinline__ uint32_t keep_bits_t(const Params& p, uint64_t seed, int64_t stats, int key_base, int lane) {
  const int group = lane / 4, quad = lane % 4, t = group & 3;
  uint32_t bits = 0;
#pragma unroll
  for (int nb = 0; nb < kBlockM / 8; ++nb) {
    // This lane's call: query column e = t & 1, keys of the group + 8 r, r = t >> 1.
    const int64_t row = stats + nb * 8 + 2 * quad + (t & 1);
    const int key_group = (key_base + (group & ~3) + 8 * (t >> 1)) >> 2;
    const Philox4 x = philox4x32(static_cast<uint64_t>(row), static_cast<uint32_t>(key_group), seed);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int out_index = (t + k) & 3;
      const uint32_t send = out_index == 0 ? x.x[0] : out_index == 1 ? x.x[1] : out_index == 2 ? x.x[2] : x.x[3];
      const int source = (t - k) & 3;  // its call is (e, r) = (source & 1, source >> 1)
      const uint32_t draw = __shfl_sync(0xffffffffu, send, (lane & ~12) | (source << 2));
      if (draw >= p.dropout_threshold) bits |= 1u << (nb * 4 + 2 * (source >> 1) + (source & 1));
    }
  }
  return bits;
}

template <typename T, int D>
__global__ void __launch_bounds__(BackwardConfig<D>::kThreads) dkdv_kernel(const Params p) {
  using C = BackwardConfig<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + C::kBlockN * D;
  T* sQ = sV + C::kBlockN * D;       // two buffers of kBlockM rows
  T* sdO = sQ + 2 * C::kBlockM * D;  // two buffers
  float* sLse = reinterpret_cast<float*>(smem + C::kDkDvTileBytes);  // two buffers, natural log
  float* sDelta = sLse + 2 * C::kBlockM;                             // two buffers
  int* sLo = reinterpret_cast<int*>(sDelta + 2 * C::kBlockM);        // two buffers of query ranges
  int* sHi = sLo + 2 * C::kBlockM;                                    // two buffers

  const int b = blockIdx.z, hk = blockIdx.y, key0 = (blockIdx.x / p.dkdv_splits) * C::kBlockN;
  const int split = blockIdx.x % p.dkdv_splits;
  const int group_size = p.Hq / p.Hkv;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int group = lane / 4, quad = lane % 4;
  const int keys = min(C::kBlockN, p.Lk - key0);  // inside Lk
  const int q_valid = clamp_length(p.q_lengths, b, p.Lq);

  // The keys of this block that the mask and kv_lengths leave; only they are loaded.
  const int n_keys = clamp_length(p.kv_lengths, b, p.Lk);
  bool key_ok[2];  // this thread's two key rows
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = key0 + warp * 16 + group + 8 * r;
    key_ok[r] = j < n_keys && !key_masked(p, b, j);
  }
  // Unsplit, dK and dV go straight to their tensors; split, this CTA's fp32 share goes to the
  // partials (split, b, hk, key, d), which dkdv_reduce_kernel adds up.
  const bool partial = p.dkdv_splits > 1;
  T* dk = p.dk.rows<T>(b, hk) + key0 * p.dk.sl;
  T* dv = p.dv.rows<T>(b, hk) + key0 * p.dv.sl;
  const int64_t key_rows = (static_cast<int64_t>(split) * p.B * p.Hkv + static_cast<int64_t>(b) * p.Hkv + hk) * p.Lk + key0;
  float* part_dk = partial ? p.partial_dk + key_rows * D : nullptr;
  float* part_dv = partial ? p.partial_dv + key_rows * D : nullptr;

  // Step t covers query head hk * group_size + t / m_blocks, query block t % m_blocks; this CTA
  // takes its split's share of the steps, and skips those whose rows see none of its keys.
  const int m_blocks = (q_valid + C::kBlockM - 1) / C::kBlockM;
  const int steps = group_size * m_blocks, per_split = (steps + p.dkdv_splits - 1) / p.dkdv_splits;
  const int step0 = min(steps, split * per_split), step1 = min(steps, step0 + per_split);
  const bool any_key = __syncthreads_or(key_ok[0] || key_ok[1]) != 0;
  if (!any_key || step0 >= step1) {  // hidden keys, or no query to take gradients from
    if (partial) {
      zero_rows<float, D, C::kThreads>(part_dk, D, keys);
      zero_rows<float, D, C::kThreads>(part_dv, D, keys);
    } else {
      zero_rows<T, D, C::kThreads>(dk, p.dk.sl, keys);
      zero_rows<T, D, C::kThreads>(dv, p.dv.sl, keys);
    }
    return;
  }

  auto step_rows = [&](int t, int& h, int& i0, int& n) {
    h = hk * group_size + t / m_blocks;
    i0 = (t % m_blocks) * C::kBlockM;
    n = min(C::kBlockM, q_valid - i0);
  };
  auto prepare = [&](int t, int buf) {
    int h, i0, n;
    step_rows(t, h, i0, n);
    int meets = 0;
    for (int r = threadIdx.x; r < C::kBlockM; r += C::kThreads) {
      const RowRange rr = r < n ? row_range(p, b, i0 + r) : RowRange{0, 0};
      sLo[buf * C::kBlockM + r] = rr.lo;
      sHi[buf * C::kBlockM + r] = rr.hi;
      meets |= rr.hi > rr.lo && rr.lo < key0 + C::kBlockN && rr.hi > key0;
    }
    return __syncthreads_or(meets) != 0;
  };
  auto load_step = [&](int t, int buf) {
    int h, i0, n;
    step_rows(t, h, i0, n);
    load_tile<T, C::kBlockM, D, C::kThreads>(sQ + buf * C::kBlockM * D, p.q.rows<T>(b, h) + i0 * p.q.sl, p.q.sl, n);
    load_tile<T, C::kBlockM, D, C::kThreads>(sdO + buf * C::kBlockM * D, p.dout.rows<T>(b, h) + i0 * p.dout.sl,
                                             p.dout.sl, n);
    // The rows' statistics travel with their tiles; rows >= n are padding, which their empty
    // ranges (prepare) hide whatever these hold.
    const int64_t stats = (static_cast<int64_t>(b) * p.Hq + h) * p.Lq + i0;
    for (int r = threadIdx.x; r < C::kBlockM; r += C::kThreads) {
      const bool ok = r < n;
      cp_async_4(sLse + buf * C::kBlockM + r, p.lse + (ok ? stats + r : 0), ok);
      cp_async_4(sDelta + buf * C::kBlockM + r, p.delta + (ok ? stats + r : 0), ok);
    }
  };
  load_keys<T, C::kBlockN, D, C::kThreads>(sK, p.k.rows<T>(b, hk) + key0 * p.k.sl, p.k.sl, p, b, key0, n_keys);
  load_keys<T, C::kBlockN, D, C::kThreads>(sV, p.v.rows<T>(b, hk) + key0 * p.v.sl, p.v.sl, p, b, key0, n_keys);

  const uint64_t seed = p.seed != nullptr ? static_cast<uint64_t>(*p.seed) : 0;
  const float scale_log2 = p.scale * kLog2e;
  const int warp_key0 = warp * 16;
  float dk_acc[1][D / 8][4], dv_acc[1][D / 8][4];
  zero(dk_acc);
  zero(dv_acc);

  pipeline(step0, step1, prepare, load_step, [&](int t, int buf) {
    const T* q = sQ + buf * C::kBlockM * D;
    const T* dout = sdO + buf * C::kBlockM * D;
    const float* lse = sLse + buf * C::kBlockM;
    const float* delta = sDelta + buf * C::kBlockM;
    const int* lo = sLo + buf * C::kBlockM;
    const int* hi = sHi + buf * C::kBlockM;
    int h, i0, n;
    step_rows(t, h, i0, n);

    // P^T = exp2(scale_log2 K Q^T - lse2): keys are the rows here, queries the columns.
    float pt[1][C::kBlockM / 8][4];
    zero(pt);
    mma_a_bt<T, D, C::kBlockM, 1>(pt, sK, warp_key0, q, lane);
#pragma unroll
    for (int nb = 0; nb < C::kBlockM / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nb * 8 + 2 * quad + (e & 1), j = key0 + warp_key0 + group + 8 * (e / 2);
        const bool visible = key_ok[e / 2] && lo[col] <= j && j < hi[col];
        pt[0][nb][e] = visible ? exp2f(pt[0][nb][e] * scale_log2 - lse[col] * kLog2e) : 0.f;
      }
    }
    float dst[1][C::kBlockM / 8][4];  // dP^T = V dO^T, then dS^T in place
    zero(dst);
    mma_a_bt<T, D, C::kBlockM, 1>(dst, sV, warp_key0, dout, lane);
    if (p.seed != nullptr) {  // the kept probabilities, scaled, weight dO; the same mask scales dP
      const int64_t stats = (static_cast<int64_t>(b) * p.Hq + h) * p.Lq + i0;
      const uint32_t keep = keep_bits_t<C::kBlockM>(p, seed, stats, key0 + warp_key0, lane);
      float zt[1][C::kBlockM / 8][4];
#pragma unroll
      for (int nb = 0; nb < C::kBlockM / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool kept = (keep >> (nb * 4 + e)) & 1u;
          dst[0][nb][e] = kept ? dst[0][nb][e] * p.keep_scale : 0.f;
          zt[0][nb][e] = kept ? pt[0][nb][e] * p.keep_scale : 0.f;
        }
      }
      mma_p_b<T, C::kBlockM, D, 1>(dv_acc, zt, dout, lane);  // dV += Z^T dO
    } else {
      mma_p_b<T, C::kBlockM, D, 1>(dv_acc, pt, dout, lane);  // dV += P^T dO
    }
#pragma unroll
    for (int nb = 0; nb < C::kBlockM / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[0][nb][e] = softmax_grad(pt[0][nb][e], dst[0][nb][e], delta[nb * 8 + 2 * quad + (e & 1)]);
    }
    mma_p_b<T, C::kBlockM, D, 1>(dk_acc, dst, q, lane);  // dK += dS^T Q (unscaled)
  });

  // Hidden keys get exactly 0, even where dO holds non-finite values.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!key_ok[r]) {
      zero_row(dk_acc[0], r);
      zero_row(dv_acc[0], r);
    }
  }
  const float dk_scale[2] = {p.scale, p.scale}, one[2] = {1.f, 1.f};
  if (!partial) {
    store_rows<T, D>(dk, p.dk.sl, dk_acc[0], warp_key0, keys, dk_scale, lane);
    store_rows<T, D>(dv, p.dv.sl, dv_acc[0], warp_key0, keys, one, lane);
    return;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp_key0 + group + 8 * r;
    if (row >= keys) continue;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      *reinterpret_cast<float2*>(part_dk + row * D + nd * 8 + 2 * quad) = make_float2(dk_acc[0][nd][2 * r], dk_acc[0][nd][2 * r + 1]);
      *reinterpret_cast<float2*>(part_dv + row * D + nd * 8 + 2 * quad) = make_float2(dv_acc[0][nd][2 * r], dv_acc[0][nd][2 * r + 1]);
    }
  }
}

// dK and dV of every key from the dkdv_splits partials, summed in split order: one warp per
// (batch, kv head, key) row.
template <typename T, int D>
__global__ void dkdv_reduce_kernel(const Params p) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kQueryRowsPerBlock + threadIdx.x / kWarpSize;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hkv * p.Lk;
  if (index >= rows) return;  // the same for the whole warp
  const int lane = threadIdx.x % kWarpSize;
  const int j = static_cast<int>(index % p.Lk), hk = static_cast<int>(index / p.Lk % p.Hkv);
  const int b = static_cast<int>(index / p.Lk / p.Hkv);
  constexpr int kPerLane = D / kWarpSize;  // 2 or 4 consecutive pairs of columns
  float k_sum[kPerLane] = {}, v_sum[kPerLane] = {};
  for (int s = 0; s < p.dkdv_splits; ++s) {
    const int64_t at = (s * rows + index) * D;
#pragma unroll
    for (int c = 0; c < kPerLane; c += 2) {
      const float2 x = *reinterpret_cast<const float2*>(p.partial_dk + at + c * kWarpSize + 2 * lane);
      const float2 y = *reinterpret_cast<const float2*>(p.partial_dv + at + c * kWarpSize + 2 * lane);
      k_sum[c] += x.x, k_sum[c + 1] += x.y;
      v_sum[c] += y.x, v_sum[c + 1] += y.y;
    }
  }
  T* dk = p.dk.rows<T>(b, hk) + j * p.dk.sl;
  T* dv = p.dv.rows<T>(b, hk) + j * p.dv.sl;
#pragma unroll
  for (int c = 0; c < kPerLane; c += 2) {
    *reinterpret_cast<uint32_t*>(dk + c * kWarpSize + 2 * lane) = pack2<T>(k_sum[c] * p.scale, k_sum[c + 1] * p.scale);
    *reinterpret_cast<uint32_t*>(dv + c * kWarpSize + 2 * lane) = pack2<T>(v_sum[c], v_sum[c + 1]);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(BackwardConfig<D>::kThreads) dq_kernel(const Params p) {
  using C = BackwardConfig<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + C::kQueries * D;
  T* sK = sdO + C::kQueries * D;  // two buffers of kKeys rows
  T* sV = sK + 2 * C::kKeys * D;  // two buffers
  int* sLo = reinterpret_cast<int*>(smem + C::kDqTileBytes);
  int* sHi = sLo + C::kQueries;
  uint8_t* sNeed = reinterpret_cast<uint8_t*>(sHi + C::kQueries);  // two buffers of kKeys flags

  const QueryBlock blk = query_block<C::kQueries>(p, blockIdx.x);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const Span span = stage_rows<C::kQueries, C::kThreads>(p, blk.b, blk.row0, blk.valid, sLo, sHi);
  T* dq = p.dq.rows<T>(blk.b, blk.h) + blk.row0 * p.dq.sl;
  if (blk.valid == 0 || span.last <= span.first) {
    zero_rows<T, D, C::kThreads>(dq, p.dq.sl, blk.rows);
    return;
  }

  const T* k = p.k.rows<T>(blk.b, blk.hk);
  const T* v = p.v.rows<T>(blk.b, blk.hk);
  auto prepare = [&](int tile, int buf) {
    return prepare_tile<C::kQueries>(p, blk.b, tile, span, sLo, sHi, sNeed + buf * C::kKeys);
  };
  auto load_kv = [&](int tile, int buf) {
    load_kv_tile<T, C::kKeys, D, C::kThreads>(sK, sV, k, v, p, tile, buf, sNeed + buf * C::kKeys);
  };
  load_tile<T, C::kQueries, D, C::kThreads>(sQ, p.q.rows<T>(blk.b, blk.h) + blk.row0 * p.q.sl, p.q.sl, blk.valid);
  load_tile<T, C::kQueries, D, C::kThreads>(sdO, p.dout.rows<T>(blk.b, blk.h) + blk.row0 * p.dout.sl, p.dout.sl,
                                            blk.valid);

  const float scale_log2 = p.scale * kLog2e;
  const int64_t stats = (static_cast<int64_t>(blk.b) * p.Hq + blk.h) * p.Lq + blk.row0;
  float lse2[2], delta[2];  // this thread's two query rows; padded rows get P = 0
  RowRange rows[2];
  int64_t drop_row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + lane / 4 + 8 * r;
    lse2[r] = row < blk.valid ? p.lse[stats + row] * kLog2e : INFINITY;
    delta[r] = row < blk.valid ? p.delta[stats + row] : 0.f;
    rows[r] = {sLo[row], sHi[row]};
    drop_row[r] = stats + row;
  }
  const uint64_t seed = p.seed != nullptr ? static_cast<uint64_t>(*p.seed) : 0;
  const int warp_row0 = warp * 16;
  float dq_acc[1][D / 8][4];
  zero(dq_acc);
  const int tile0 = span.first / C::kKeys, tile1 = (span.last + C::kKeys - 1) / C::kKeys;

  pipeline(tile0, tile1, prepare, load_kv, [&](int tile, int buf) {
    const int j0 = tile * C::kKeys;
    const bool whole = span.max_lo <= j0 && span.min_hi >= j0 + C::kKeys;
    const T* k_tile = sK + buf * C::kKeys * D;
    float s[1][C::kKeys / 8][4];  // scores, then P
    zero(s);
    mma_a_bt<T, D, C::kKeys, 1>(s, sQ, warp_row0, k_tile, lane);
    scale_all(s[0], scale_log2);
    bool seen[2] = {false, false};
    hide_scores<C::kKeys>(s[0], sNeed + buf * C::kKeys, j0, whole, rows, seen, lane);
#pragma unroll
    for (int nb = 0; nb < C::kKeys / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][nb][e] = exp2f(s[0][nb][e] - lse2[e / 2]);
    }
    float ds[1][C::kKeys / 8][4];  // dP = dO V^T, then dS in place
    zero(ds);
    mma_a_bt<T, D, C::kKeys, 1>(ds, sdO, warp_row0, sV + buf * C::kKeys * D, lane);
    if (p.seed != nullptr) drop_rows<C::kKeys>(ds[0], p, seed, drop_row, j0, lane);
#pragma unroll
    for (int nb = 0; nb < C::kKeys / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[0][nb][e] = softmax_grad(s[0][nb][e], ds[0][nb][e], delta[e / 2]);
    }
    mma_p_b<T, C::kKeys, D, 1>(dq_acc, ds, k_tile, lane);  // dQ += dS K (unscaled)
  });

  const float dq_scale[2] = {p.scale, p.scale};
  store_rows<T, D>(dq, p.dq.sl, dq_acc[0], warp_row0, blk.rows, dq_scale, lane);
}

template <typename T, int D>
void run_backward(const Params& p, cudaStream_t stream) {
  using C = BackwardConfig<D>;
  if (p.B == 0 || p.Hq == 0 || p.Lq == 0 || p.Lk == 0) return;  // nothing to write (the host zeroes empty grads)
  launch_per_row(delta_kernel<T, D>, p, stream);
  launch(dkdv_kernel<T, D>, dim3((p.Lk + C::kBlockN - 1) / C::kBlockN * p.dkdv_splits, p.Hkv, p.B), C::kThreads,
         C::kDkDvSmemBytes, stream, p);
  if (p.dkdv_splits > 1) {
    const int64_t rows = static_cast<int64_t>(p.B) * p.Hkv * p.Lk;
    launch(dkdv_reduce_kernel<T, D>, dim3(static_cast<unsigned>((rows + kQueryRowsPerBlock - 1) / kQueryRowsPerBlock)),
           kQueryRowsPerBlock * kWarpSize, 0, stream, p);
  }
  launch(dq_kernel<T, D>, dim3((p.Lq + C::kQueries - 1) / C::kQueries, p.Hq, p.B), C::kThreads, C::kDqSmemBytes,
         stream, p);
}

}  // namespace mmkernels::attention
