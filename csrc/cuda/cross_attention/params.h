// The arguments of the CUDA attention kernels, filled by cross_attention.cu from tensors that
// are already checked: raw pointers, strides in elements (64-bit), lengths.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mmkernels::attention {

// One (B, H, L, D) operand with a contiguous last dim.
struct Operand {
  void* ptr = nullptr;
  int64_t sb = 0, sh = 0, sl = 0;

  template <typename T>
  __host__ __device__ T* rows(int b, int h) const {
    return static_cast<T*>(ptr) + b * sb + h * sh;
  }
};

// The forward's tile sizes (both head dims; mmkernels/limits.py), which the host needs to choose
// kv_splits.
constexpr int kForwardBlockM = 128;
constexpr int kForwardBlockN = 64;
constexpr int kMaxKvSplits = 16;

// Few query blocks over many keys (a short text attending to a long image or audio sequence)
// would leave most SMs idle with one CTA per query block: the key tiles are then shared among
// up to kMaxKvSplits CTAs, about one wave in all, at least two tiles each. Decided on shapes
// only, never on kv_lengths values, so there is no host sync and CUDA graphs replay it unchanged.
inline int kv_splits_for(int64_t q_blocks, int64_t sms, int64_t lk) {
  const int64_t key_tiles = (lk + kForwardBlockN - 1) / kForwardBlockN;
  const int64_t for_one_wave = (sms + q_blocks - 1) / q_blocks;
  const int64_t splits = for_one_wave < key_tiles / 2 ? for_one_wave : key_tiles / 2;
  return static_cast<int>(splits < 1 ? 1 : (splits > kMaxKvSplits ? kMaxKvSplits : splits));
}

// Few key blocks (one long image over few heads, or a small batch) leave most SMs idle with one
// dK/dV CTA per key block: the query steps are then shared among up to kMaxDkDvSplits CTAs, about
// two waves in all, at least two steps each. On shapes only, like kv_splits_for.
constexpr int kMaxDkDvSplits = 16;

inline int dkdv_splits_for(int64_t key_ctas, int64_t sms, int64_t steps) {
  if (key_ctas >= sms) return 1;
  const int64_t for_two_waves = (2 * sms + key_ctas - 1) / key_ctas;
  const int64_t splits = for_two_waves < steps / 2 ? for_two_waves : steps / 2;
  return static_cast<int>(splits < 1 ? 1 : (splits > kMaxDkDvSplits ? kMaxDkDvSplits : splits));
}

// Key tiles of every kernel are kKeyTile keys, aligned to multiples of it.
constexpr int kKeyTile = 64;
static_assert(kKeyTile == kForwardBlockN, "the forward's key tiles are the key tiles");

struct Params {
  Operand q, k, v, out;
  Operand dout, dq, dk, dv;         // backward only
  float* lse = nullptr;             // (B, Hq, Lq) contiguous, natural log; +inf for rows with no key
  float* delta = nullptr;           // (B, Hq, Lq) contiguous backward scratch: rowsum(dO * O)
  const int64_t* kv_lengths = nullptr;  // (B,) or null
  const int64_t* q_lengths = nullptr;   // (B,) or null
  const int64_t* kv_start = nullptr;    // (B, Lq) contiguous or null: row i sees keys kv_start <= j < kv_end
  const int64_t* kv_end = nullptr;      // (B, Lq) contiguous or null
  const bool* mask = nullptr;           // key_padding_mask (B, Lk), true = ignore; or null
  int64_t mask_sb = 0, mask_sk = 0;
  bool causal = false;                    // key j visible to row i only if j <= i + Lk - Lq
  // Attention dropout (csrc/philox.h): keep a probability when its Philox draw >= threshold.
  const int64_t* seed = nullptr;  // one int64 on the device; null: no dropout
  uint64_t dropout_threshold = 0;
  float keep_scale = 1.f;  // 1 / (1 - dropout_p)
  int B = 0, Hq = 0, Hkv = 0, Lq = 0, Lk = 0;
  float scale = 1.f;
  // Forward only: the key tiles of each query block are shared among kv_splits CTAs, which
  // write normalised partial outputs and their log-sum-exp (-inf: no key in that split, NaN:
  // keys whose scores all overflowed) to these contiguous fp32 buffers; a combine kernel merges
  // them into out and lse.
  int kv_splits = 1;
  float* partial_out = nullptr;  // (kv_splits, B, Hq, Lq, D)
  float* partial_lse = nullptr;  // (kv_splits, B, Hq, Lq)
  // Backward only: the query steps of each key block are shared among dkdv_splits CTAs, which
  // write their fp32 shares of dK (unscaled) and dV here; a reduce kernel sums them in order.
  int dkdv_splits = 1;
  float* partial_dk = nullptr;  // (dkdv_splits, B, Hkv, Lk, D)
  float* partial_dv = nullptr;
};

// One explicit instantiation per (T, D, direction), each in its own .cu file, so that the
// heavy template code compiles in parallel and a change recompiles only what it touches.
// T is __half or __nv_bfloat16; D is 64 or 128.
template <typename T, int D>
void run_forward(const Params& p, cudaStream_t stream);

template <typename T, int D>
void run_backward(const Params& p, cudaStream_t stream);

}  // namespace mmkernels::attention
