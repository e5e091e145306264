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
  // dkdv_kernel: 16 keys per warp; query blocks of kBlockM per step. D = 128 takes 32 queries a
  // step so that dK, dV and two score tiles stay in registers.
  static constexpr int kBlockN = 16 * kWarps;
  static constexpr int kBlockM = D <= 64 ? 64 : 32;
  // K and V; Q and dO in two buffers each; then lse and delta, two buffers each.
  static constexpr int kDkDvSmemBytes = (2 * kBlockN + 4 * kBlockM) * kLd * 2 + 4 * kBlockM * 4;
  // dq_kernel: 16 queries per warp, key tiles of kKeys.
  static constexpr int kQueries = 16 * kWarps;
  static constexpr int kKeys = 64;
  // Q and dO; K and V in two buffers each.
  static constexpr int kDqSmemBytes = (2 * kQueries + 4 * kKeys) * kLd * 2;
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

// dS = P (dP - delta), exactly 0 where P is.
__device__ __forceinline__ float softmax_grad(float prob, float dprob, float delta) {
  return prob == 0.f ? 0.f : prob * (dprob - delta);
}

template <typename T, int D, bool kMask>
__global__ void __launch_bounds__(BackwardConfig<D>::kThreads) dkdv_kernel(const Params p) {
  using C = BackwardConfig<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + C::kBlockN * C::kLd;
  T* sQ = sV + C::kBlockN * C::kLd;       // two buffers of kBlockM rows
  T* sdO = sQ + 2 * C::kBlockM * C::kLd;  // two buffers
  float* sLse = reinterpret_cast<float*>(sdO + 2 * C::kBlockM * C::kLd);  // two buffers, base 2
  float* sDelta = sLse + 2 * C::kBlockM;                                  // two buffers

  const int b = blockIdx.z, hk = blockIdx.y, key0 = blockIdx.x * C::kBlockN;
  const int group_size = p.Hq / p.Hkv;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int group = lane / 4, quad = lane % 4;
  const int keys = min(C::kBlockN, p.Lk - key0);  // inside Lk
  const int n_keys = clamp_length(p.kv_lengths, b, p.Lk);
  const int valid_keys = max(0, min(keys, n_keys - key0));
  const int q_valid = clamp_length(p.q_lengths, b, p.Lq);

  T* dk = p.dk.rows<T>(b, hk) + key0 * p.dk.sl;
  T* dv = p.dv.rows<T>(b, hk) + key0 * p.dv.sl;
  if (valid_keys == 0 || q_valid == 0) {  // padded keys, or no query to take gradients from
    zero_rows<T, D, C::kThreads>(dk, p.dk.sl, keys);
    zero_rows<T, D, C::kThreads>(dv, p.dv.sl, keys);
    return;
  }

  // Step t covers query head hk * group_size + t / m_blocks, query block t % m_blocks.
  const int m_blocks = (q_valid + C::kBlockM - 1) / C::kBlockM;
  auto load_step = [&](int t, int buf) {
    const int h = hk * group_size + t / m_blocks, i0 = (t % m_blocks) * C::kBlockM;
    const int n = min(C::kBlockM, q_valid - i0);
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
  load_tile<T, C::kBlockN, D, C::kThreads>(sK, p.k.rows<T>(b, hk) + key0 * p.k.sl, p.k.sl, valid_keys);
  load_tile<T, C::kBlockN, D, C::kThreads>(sV, p.v.rows<T>(b, hk) + key0 * p.v.sl, p.v.sl, valid_keys);

  const float scale_log2 = p.scale * kLog2e;
  const T* k_warp = sK + warp * 16 * C::kLd;
  const T* v_warp = sV + warp * 16 * C::kLd;
  bool visible[2];  // this thread's two key rows
#pragma unroll
  for (int r = 0; r < 2; ++r) visible[r] = key_visible<kMask>(p, b, key0 + warp * 16 + group + 8 * r, n_keys);
  float dk_acc[D / 8][4], dv_acc[D / 8][4];
  zero(dk_acc);
  zero(dv_acc);

  pipeline(group_size * m_blocks, load_step, [&](int, int buf) {
    const T* q = sQ + buf * C::kBlockM * C::kLd;
    const T* dout = sdO + buf * C::kBlockM * C::kLd;
    const float* lse = sLse + buf * C::kBlockM;
    const float* delta = sDelta + buf * C::kBlockM;

    // P^T = exp2(scale_log2 K Q^T - lse2): keys are the rows here, queries the columns.
    float pt[C::kBlockM / 8][4];
    zero(pt);
    mma_a_bt<T, D, C::kBlockM, C::kLd>(pt, k_warp, q, lane);
#pragma unroll
    for (int nb = 0; nb < C::kBlockM / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nb * 8 + 2 * quad + (e & 1);
        pt[nb][e] = visible[e / 2] ? exp2f(pt[nb][e] * scale_log2 - lse[col]) : 0.f;
      }
    }
    mma_p_b<T, C::kBlockM, D, C::kLd>(dv_acc, pt, dout, lane);  // dV += P^T dO

    float dst[C::kBlockM / 8][4];  // dP^T = V dO^T, then dS^T in place
    zero(dst);
    mma_a_bt<T, D, C::kBlockM, C::kLd>(dst, v_warp, dout, lane);
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
    if (!visible[r]) {
      zero_row(dk_acc, r);
      zero_row(dv_acc, r);
    }
  }
  const float dk_scale[2] = {p.scale, p.scale}, one[2] = {1.f, 1.f};
  store_rows<T, D>(dk, p.dk.sl, dk_acc, warp * 16, keys, dk_scale, lane);
  store_rows<T, D>(dv, p.dv.sl, dv_acc, warp * 16, keys, one, lane);
}

template <typename T, int D, bool kMask>
__global__ void __launch_bounds__(BackwardConfig<D>::kThreads) dq_kernel(const Params p) {
  using C = BackwardConfig<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + C::kQueries * C::kLd;
  T* sK = sdO + C::kQueries * C::kLd;  // two buffers of kKeys rows
  T* sV = sK + 2 * C::kKeys * C::kLd;  // two buffers

  const QueryBlock blk = query_block<C::kQueries>(p, blockIdx.x);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  T* dq = p.dq.rows<T>(blk.b, blk.h) + blk.row0 * p.dq.sl;
  if (blk.valid == 0 || blk.n_keys == 0) {
    zero_rows<T, D, C::kThreads>(dq, p.dq.sl, blk.rows);
    return;
  }

  const T* k = p.k.rows<T>(blk.b, blk.hk);
  const T* v = p.v.rows<T>(blk.b, blk.hk);
  auto load_kv = [&](int tile, int buf) {
    load_kv_tile<T, C::kKeys, D, C::kThreads>(sK, sV, k, v, p, blk.n_keys, tile, buf);
  };
  load_tile<T, C::kQueries, D, C::kThreads>(sQ, p.q.rows<T>(blk.b, blk.h) + blk.row0 * p.q.sl, p.q.sl, blk.valid);
  load_tile<T, C::kQueries, D, C::kThreads>(sdO, p.dout.rows<T>(blk.b, blk.h) + blk.row0 * p.dout.sl, p.dout.sl,
                                            blk.valid);

  const float scale_log2 = p.scale * kLog2e;
  const int64_t stats = (static_cast<int64_t>(blk.b) * p.Hq + blk.h) * p.Lq + blk.row0;
  float lse2[2], delta[2];  // this thread's two query rows; padded rows get P = 0
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + lane / 4 + 8 * r;
    lse2[r] = row < blk.valid ? p.lse[stats + row] * kLog2e : INFINITY;
    delta[r] = row < blk.valid ? p.delta[stats + row] : 0.f;
  }
  const T* q_warp = sQ + warp * 16 * C::kLd;
  const T* do_warp = sdO + warp * 16 * C::kLd;
  float dq_acc[D / 8][4];
  zero(dq_acc);

  pipeline((blk.n_keys + C::kKeys - 1) / C::kKeys, load_kv, [&](int t, int buf) {
    const T* k_tile = sK + buf * C::kKeys * C::kLd;
    float s[C::kKeys / 8][4];  // scores, then P
    zero(s);
    mma_a_bt<T, D, C::kKeys, C::kLd>(s, q_warp, k_tile, lane);
    scale_all(s, scale_log2);
    hide_key_columns<kMask, C::kKeys>(s, p, blk.b, t * C::kKeys, blk.n_keys, lane);
#pragma unroll
    for (int nb = 0; nb < C::kKeys / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nb][e] = exp2f(s[nb][e] - lse2[e / 2]);
    }
    float ds[C::kKeys / 8][4];  // dP = dO V^T, then dS in place
    zero(ds);
    mma_a_bt<T, D, C::kKeys, C::kLd>(ds, do_warp, sV + buf * C::kKeys * C::kLd, lane);
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

template <typename T, int D, bool kMask>
void launch_backward(const Params& p, cudaStream_t stream) {
  using C = BackwardConfig<D>;
  launch(dkdv_kernel<T, D, kMask>, dim3((p.Lk + C::kBlockN - 1) / C::kBlockN, p.Hkv, p.B), C::kThreads,
         C::kDkDvSmemBytes, stream, p);
  launch(dq_kernel<T, D, kMask>, dim3((p.Lq + C::kQueries - 1) / C::kQueries, p.Hq, p.B), C::kThreads,
         C::kDqSmemBytes, stream, p);
}

template <typename T, int D>
void run_backward(const Params& p, cudaStream_t stream) {
  launch_per_row(delta_kernel<T, D>, p, stream);
  if (p.mask != nullptr) {
    launch_backward<T, D, true>(p, stream);
  } else {
    launch_backward<T, D, false>(p, stream);
  }
}

}  // namespace mmkernels::attention
