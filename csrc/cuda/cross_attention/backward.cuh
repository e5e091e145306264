// FlashAttention-2 backward on tensor cores (mma.sync, sm_80+), in three kernels and without
// atomics, so gradients are deterministic:
//   delta_kernel  delta = rowsum(dO * O), once per query row;
//   dkdv_kernel   one CTA per (block of kBlockN keys, kv head, batch) owns dK and dV of its keys
//                 and walks every query block of every query head in its GQA group;
//   dq_kernel     one CTA per (block of queries, query head, batch) owns dQ, walking the keys.
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
  static constexpr int kLd = D + kPad;
  // dkdv_kernel: 16 keys per warp; query blocks of kBlockM per step, small enough that dK, dV,
  // the two score tiles and the dropout draws stay in registers (ptxas -v: no spills,
  // tools/compile_gpu.py --cuda).
  static constexpr int kBlockN = 16 * kWarps;
  static_assert(kBlockN == kKeyTile, "a dK/dV block is one key tile");
  static constexpr int kBlockM = 16;
  // K and V; Q and dO in two buffers each; then lse and delta, and the query rows' key ranges,
  // two buffers each.
  static constexpr int kDkDvTileBytes = (2 * kBlockN + 4 * kBlockM) * kLd * 2;
  static constexpr int kDkDvSmemBytes = kDkDvTileBytes + 2 * kBlockM * 4 * 4;
  // dq_kernel: 16 queries per warp, key tiles of kKeys.
  static constexpr int kQueries = 16 * kWarps;
  static constexpr int kKeys = kKeyTile;
  // Q and dO; K and V in two buffers each; then the rows' key ranges and two buffers of
  // needed-key flags.
  static constexpr int kDqTileBytes = (2 * kQueries + 4 * kKeys) * kLd * 2;
  static constexpr int kDqSmemBytes = kDqTileBytes + 2 * kQueries * 4 + 2 * kKeys;
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

template <typename T, int D>
__global__ void __launch_bounds__(BackwardConfig<D>::kThreads) dkdv_kernel(const Params p) {
  using C = BackwardConfig<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + C::kBlockN * C::kLd;
  T* sQ = sV + C::kBlockN * C::kLd;       // two buffers of kBlockM rows
  T* sdO = sQ + 2 * C::kBlockM * C::kLd;  // two buffers
  float* sLse = reinterpret_cast<float*>(smem + C::kDkDvTileBytes);  // two buffers, base 2
  float* sDelta = sLse + 2 * C::kBlockM;                             // two buffers
  int* sLo = reinterpret_cast<int*>(sDelta + 2 * C::kBlockM);        // two buffers of query ranges
  int* sHi = sLo + 2 * C::kBlockM;                                    // two buffers

  const int b = blockIdx.z, hk = blockIdx.y, key0 = blockIdx.x * C::kBlockN;
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
  T* dk = p.dk.rows<T>(b, hk) + key0 * p.dk.sl;
  T* dv = p.dv.rows<T>(b, hk) + key0 * p.dv.sl;
  const bool any_key = __syncthreads_or(key_ok[0] || key_ok[1]) != 0;
  if (!any_key || q_valid == 0) {  // hidden keys, or no query to take gradients from
    zero_rows<T, D, C::kThreads>(dk, p.dk.sl, keys);
    zero_rows<T, D, C::kThreads>(dv, p.dv.sl, keys);
    return;
  }

  // Step t covers query head hk * group_size + t / m_blocks, query block t % m_blocks; steps
  // whose rows see none of this block's keys are skipped.
  const int m_blocks = (q_valid + C::kBlockM - 1) / C::kBlockM;
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
    load_tile<T, C::kBlockM, D, C::kThreads>(sQ + buf * C::kBlockM * C::kLd, p.q.rows<T>(b, h) + i0 * p.q.sl,
                                             p.q.sl, n);
    load_tile<T, C::kBlockM, D, C::kThreads>(sdO + buf * C::kBlockM * C::kLd,
                                             p.dout.rows<T>(b, h) + i0 * p.dout.sl, p.dout.sl, n);
    const int64_t stats = (static_cast<int64_t>(b) * p.Hq + h) * p.Lq + i0;
    for (int r = threadIdx.x; r < C::kBlockM; r += C::kThreads) {
      sLse[buf * C::kBlockM + r] = r < n ? p.lse[stats + r] * kLog2e : INFINITY;
      sDelta[buf * C::kBlockM + r] = r < n ? p.delta[stats + r] : 0.f;
    }
  };
  load_keys<T, C::kBlockN, D, C::kThreads>(sK, p.k.rows<T>(b, hk) + key0 * p.k.sl, p.k.sl, p, b, key0, n_keys);
  load_keys<T, C::kBlockN, D, C::kThreads>(sV, p.v.rows<T>(b, hk) + key0 * p.v.sl, p.v.sl, p, b, key0, n_keys);

  const uint64_t seed = p.seed != nullptr ? static_cast<uint64_t>(*p.seed) : 0;
  const float scale_log2 = p.scale * kLog2e;
  const T* k_warp = sK + warp * 16 * C::kLd;
  const T* v_warp = sV + warp * 16 * C::kLd;
  float dk_acc[D / 8][4], dv_acc[D / 8][4];
  zero(dk_acc);
  zero(dv_acc);

  pipeline(0, group_size * m_blocks, prepare, load_step, [&](int t, int buf) {
    const T* q = sQ + buf * C::kBlockM * C::kLd;
    const T* dout = sdO + buf * C::kBlockM * C::kLd;
    const float* lse = sLse + buf * C::kBlockM;
    const float* delta = sDelta + buf * C::kBlockM;
    const int* lo = sLo + buf * C::kBlockM;
    const int* hi = sHi + buf * C::kBlockM;
    int h, i0, n;
    step_rows(t, h, i0, n);

    // P^T = exp2(scale_log2 K Q^T - lse2): keys are the rows here, queries the columns.
    float pt[C::kBlockM / 8][4];
    zero(pt);
    mma_a_bt<T, D, C::kBlockM, C::kLd>(pt, k_warp, q, lane);
#pragma unroll
    for (int nb = 0; nb < C::kBlockM / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nb * 8 + 2 * quad + (e & 1), j = key0 + warp * 16 + group + 8 * (e / 2);
        const bool visible = key_ok[e / 2] && lo[col] <= j && j < hi[col];
        pt[nb][e] = visible ? exp2f(pt[nb][e] * scale_log2 - lse[col]) : 0.f;
      }
    }
    float dst[C::kBlockM / 8][4];  // dP^T = V dO^T, then dS^T in place
    zero(dst);
    mma_a_bt<T, D, C::kBlockM, C::kLd>(dst, v_warp, dout, lane);
    if (p.seed != nullptr) {  // the kept probabilities, scaled, weighted V; the same mask scales dP
      const int64_t stats = (static_cast<int64_t>(b) * p.Hq + h) * p.Lq + i0;
#pragma unroll
      for (int nb = 0; nb < C::kBlockM / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nb * 8 + 2 * quad + (e & 1), j = key0 + warp * 16 + group + 8 * (e / 2);
          const Philox4 x = philox4x32(static_cast<uint64_t>(stats + col), static_cast<uint32_t>(j >> 2), seed);
          const bool keep = x.x[j & 3] >= p.dropout_threshold;
          dst[nb][e] = keep ? dst[nb][e] * p.keep_scale : 0.f;
        }
      }
      float zt[C::kBlockM / 8][4];
#pragma unroll
      for (int nb = 0; nb < C::kBlockM / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nb * 8 + 2 * quad + (e & 1), j = key0 + warp * 16 + group + 8 * (e / 2);
          const Philox4 x = philox4x32(static_cast<uint64_t>(stats + col), static_cast<uint32_t>(j >> 2), seed);
          zt[nb][e] = x.x[j & 3] >= p.dropout_threshold ? pt[nb][e] * p.keep_scale : 0.f;
        }
      }
      mma_p_b<T, C::kBlockM, D, C::kLd>(dv_acc, zt, dout, lane);  // dV += Z^T dO
    } else {
      mma_p_b<T, C::kBlockM, D, C::kLd>(dv_acc, pt, dout, lane);  // dV += P^T dO
    }
#pragma unroll
    for (int nb = 0; nb < C::kBlockM / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[nb][e] = softmax_grad(pt[nb][e], dst[nb][e], delta[nb * 8 + 2 * quad + (e & 1)]);
    }
    mma_p_b<T, C::kBlockM, D, C::kLd>(dk_acc, dst, q, lane);  // dK += dS^T Q (unscaled)
  });

  // Hidden keys get exactly 0, even where dO holds non-finite values.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!key_ok[r]) {
      zero_row(dk_acc, r);
      zero_row(dv_acc, r);
    }
  }
  const float dk_scale[2] = {p.scale, p.scale}, one[2] = {1.f, 1.f};
  store_rows<T, D>(dk, p.dk.sl, dk_acc, warp * 16, keys, dk_scale, lane);
  store_rows<T, D>(dv, p.dv.sl, dv_acc, warp * 16, keys, one, lane);
}

template <typename T, int D>
__global__ void __launch_bounds__(BackwardConfig<D>::kThreads) dq_kernel(const Params p) {
  using C = BackwardConfig<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + C::kQueries * C::kLd;
  T* sK = sdO + C::kQueries * C::kLd;  // two buffers of kKeys rows
  T* sV = sK + 2 * C::kKeys * C::kLd;  // two buffers
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
  const T* q_warp = sQ + warp * 16 * C::kLd;
  const T* do_warp = sdO + warp * 16 * C::kLd;
  float dq_acc[D / 8][4];
  zero(dq_acc);
  const int tile0 = span.first / C::kKeys, tile1 = (span.last + C::kKeys - 1) / C::kKeys;

  pipeline(tile0, tile1, prepare, load_kv, [&](int tile, int buf) {
    const int j0 = tile * C::kKeys;
    const bool whole = span.max_lo <= j0 && span.min_hi >= j0 + C::kKeys;
    const T* k_tile = sK + buf * C::kKeys * C::kLd;
    float s[C::kKeys / 8][4];  // scores, then P
    zero(s);
    mma_a_bt<T, D, C::kKeys, C::kLd>(s, q_warp, k_tile, lane);
    scale_all(s, scale_log2);
    bool seen[2] = {false, false};
    hide_scores<C::kKeys>(s, sNeed + buf * C::kKeys, j0, whole, rows, seen, lane);
#pragma unroll
    for (int nb = 0; nb < C::kKeys / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nb][e] = exp2f(s[nb][e] - lse2[e / 2]);
    }
    float ds[C::kKeys / 8][4];  // dP = dO V^T, then dS in place
    zero(ds);
    mma_a_bt<T, D, C::kKeys, C::kLd>(ds, do_warp, sV + buf * C::kKeys * C::kLd, lane);
    if (p.seed != nullptr) drop_rows<C::kKeys>(ds, p, seed, drop_row, j0, lane);
#pragma unroll
    for (int nb = 0; nb < C::kKeys / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[nb][e] = softmax_grad(s[nb][e], ds[nb][e], delta[e / 2]);
    }
    mma_p_b<T, C::kKeys, D, C::kLd>(dq_acc, ds, k_tile, lane);  // dQ += dS K (unscaled)
  });

  const float dq_scale[2] = {p.scale, p.scale};
  store_rows<T, D>(dq, p.dq.sl, dq_acc, warp * 16, blk.rows, dq_scale, lane);
}

template <typename T, int D>
void run_backward(const Params& p, cudaStream_t stream) {
  using C = BackwardConfig<D>;
  launch_per_row(delta_kernel<T, D>, p, stream);
  launch(dkdv_kernel<T, D>, dim3((p.Lk + C::kBlockN - 1) / C::kBlockN, p.Hkv, p.B), C::kThreads, C::kDkDvSmemBytes,
         stream, p);
  launch(dq_kernel<T, D>, dim3((p.Lq + C::kQueries - 1) / C::kQueries, p.Hq, p.B), C::kThreads, C::kDqSmemBytes,
         stream, p);
}

}  // namespace mmkernels::attention
