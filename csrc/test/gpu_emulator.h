// Runs our CUDA kernels on the CPU, so that their logic (tiling, masking, the online softmax, the
// fragment layouts, the pipeline's buffer indices, vector widths, every store) is tested on
// machines without a GPU. Include it before the kernel headers.
//
// Each CUDA thread is a std::thread; __syncthreads is a barrier over the CTA and every
// warp-collective instruction (shuffle, ldmatrix, mma.sync) is a barrier over the warp around an
// exchange through shared scratch, computed as the PTX ISA defines it. CTAs run one after
// another. cp.async completes at once, or with emu::lazy_copies only at the wait that forces it,
// which exposes a missing wait. What it cannot find: a race between threads on shared memory
// that the OS scheduling does not happen to expose (compute-sanitizer's racecheck on a GPU
// finds those), and the asm strings of ptx.cuh, which are not executed.
#pragma once

#define MMKERNELS_EMULATE_GPU 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

#define __launch_bounds__(...)

using std::max;
using std::min;

namespace emu {

inline thread_local uint3 thread_idx;
inline uint3 block_idx;
inline dim3 block_dim, grid_dim;

constexpr int kWarp = 32;

struct Warp {
  std::barrier<> sync{kWarp};
  const void* address[kWarp];
  uint32_t regs[kWarp][6];
  float value[kWarp];
  uint32_t word[kWarp];
};

struct Cta {
  explicit Cta(int threads) : sync(threads), warps(threads / kWarp) {
    for (auto& w : warps) w = std::make_unique<Warp>();
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<Warp>> warps;
  std::atomic<int> any{0};  // __syncthreads_or
};

inline Cta* cta = nullptr;

// cp.async: with lazy_copies a thread's copies land only when its cp.async.wait_group forces
// their group, the latest a GPU may deliver them, so reading a buffer before waiting for it
// sees stale data. Without, they land at once (a write-after-read hazard then shows instead,
// if the threads happen to interleave badly).
inline bool lazy_copies = false;

struct Copy {
  void* dst;
  const void* src;
  bool valid;
  int bytes;
};

struct PendingCopies {
  std::vector<Copy> open;                 // issued since the last commit
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
};

inline thread_local PendingCopies pending;
inline std::atomic<bool> unfinished_copies{false};  // a thread exited with copies never waited for

inline void copy(void* dst, const void* src, bool valid, int bytes) {
  if (valid) {
    std::memcpy(dst, src, bytes);
  } else {
    std::memset(dst, 0, bytes);
  }
}

inline int lane() { return static_cast<int>(thread_idx.x) % kWarp; }
inline Warp& warp() { return *cta->warps[thread_idx.x / kWarp]; }

// Every lane publishes, all meet, every lane reads what it needs, all meet again before the
// scratch is reused.
template <typename Publish, typename Read>
void exchange(Publish&& publish, Read&& read) {
  Warp& w = warp();
  publish(w, lane());
  w.sync.arrive_and_wait();
  read(w, lane());
  w.sync.arrive_and_wait();
}

inline uint16_t half_at(const void* row, int i) {
  uint16_t x;
  std::memcpy(&x, static_cast<const char*>(row) + 2 * i, 2);
  return x;
}

template <typename T>
float to_float(uint16_t bits) {
  if constexpr (std::is_same_v<T, __half>) {
    __half_raw r;
    r.x = bits;
    return __half2float(__half(r));
  } else {
    __nv_bfloat16_raw r;
    r.x = bits;
    return __bfloat162float(__nv_bfloat16(r));
  }
}

// Runs kernel(args...) over the grid: CTA after CTA, one std::thread per CUDA thread;
// before_cta() runs before each CTA starts.
template <typename Kernel, typename BeforeCta, typename... Args>
void run_grid(Kernel* kernel, dim3 grid, int threads, BeforeCta&& before_cta, const Args&... args) {
  block_dim = dim3(threads);
  grid_dim = grid;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Cta this_cta(threads);
        cta = &this_cta;
        block_idx = make_uint3(x, y, z);
        before_cta();
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            thread_idx = make_uint3(t, 0, 0);
            pending = {};
            kernel(args...);
            if (!pending.open.empty() || !pending.groups.empty()) unfinished_copies = true;
          });
        }
        for (auto& th : pool) th.join();
      }
    }
  }
}

}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim

inline void __syncthreads() { emu::cta->sync.arrive_and_wait(); }

// A barrier that returns whether any thread's predicate was non-zero: everyone arrives, the
// predicates are or-ed, everyone reads, and thread 0 clears the flag before anyone can set it
// again (the first barrier of the next call waits for it).
inline int __syncthreads_or(int predicate) {
  emu::cta->sync.arrive_and_wait();
  if (predicate) emu::cta->any = 1;
  emu::cta->sync.arrive_and_wait();
  const int result = emu::cta->any.load();
  emu::cta->sync.arrive_and_wait();
  if (threadIdx.x == 0) emu::cta->any = 0;
  return result;
}
inline float __expf(float x) { return std::exp(x); }

inline float __shfl_xor_sync(unsigned, float x, int offset) {
  float out;
  emu::exchange([&](emu::Warp& w, int l) { w.value[l] = x; }, [&](emu::Warp& w, int l) { out = w.value[l ^ offset]; });
  return out;
}

inline uint32_t __shfl_xor_sync(unsigned, uint32_t x, int offset) {
  uint32_t out;
  emu::exchange([&](emu::Warp& w, int l) { w.word[l] = x; }, [&](emu::Warp& w, int l) { out = w.word[l ^ offset]; });
  return out;
}

inline uint32_t __shfl_sync(unsigned, uint32_t x, int source) {
  uint32_t out;
  emu::exchange([&](emu::Warp& w, int l) { w.word[l] = x; }, [&](emu::Warp& w, int l) { out = w.word[source % emu::kWarp]; });
  return out;
}

namespace mmkernels::attention {

alignas(16) inline unsigned char smem[256 * 1024];  // the dynamic shared memory of the running CTA

inline void cp_async_16(void* dst, const void* src, bool valid) {
  if (!emu::lazy_copies) return emu::copy(dst, src, valid, 16);
  emu::pending.open.push_back({dst, src, valid, 16});
}
inline void cp_async_4(void* dst, const void* src, bool valid) {
  if (!emu::lazy_copies) return emu::copy(dst, src, valid, 4);
  emu::pending.open.push_back({dst, src, valid, 4});
}
inline void cp_async_commit() {
  if (emu::lazy_copies) emu::pending.groups.push_back(std::move(emu::pending.open)), emu::pending.open.clear();
}
template <int kPending>
void cp_async_wait() {
  auto& groups = emu::pending.groups;
  while (static_cast<int>(groups.size()) > kPending) {
    for (const auto& c : groups.front()) emu::copy(c.dst, c.src, c.valid, c.bytes);
    groups.erase(groups.begin());
  }
}

// Register i of lane l: matrix i's row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1, where row r of
// matrix i starts at the address lane 8 i + r gave.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* src) {
  emu::exchange([&](emu::Warp& w, int l) { w.address[l] = src; },
                [&](emu::Warp& w, int l) {
                  for (int i = 0; i < 4; ++i) {
                    const void* row = w.address[8 * i + l / 4];
                    r[i] = emu::half_at(row, 2 * (l % 4)) | uint32_t(emu::half_at(row, 2 * (l % 4) + 1)) << 16;
                  }
                });
}

// .trans: register i of lane l holds matrix i's elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4).
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* src) {
  emu::exchange([&](emu::Warp& w, int l) { w.address[l] = src; },
                [&](emu::Warp& w, int l) {
                  for (int i = 0; i < 4; ++i) {
                    const uint16_t lo = emu::half_at(w.address[8 * i + 2 * (l % 4)], l / 4);
                    const uint16_t hi = emu::half_at(w.address[8 * i + 2 * (l % 4) + 1], l / 4);
                    r[i] = lo | uint32_t(hi) << 16;
                  }
                });
}

// m16n8k16, row.col: A[row][k] is in lane 4 (row % 8) + (k % 8) / 2, register (row >= 8) + 2 (k >= 8),
// half k % 2; B[k][n] in lane 4 n + (k % 8) / 2, register b0 (k < 8) or b1, half k % 2;
// C[row][n] in lane 4 (row % 8) + n / 2, element 2 (row >= 8) + n % 2.
template <typename T>
void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  auto element = [](uint32_t reg, int k) { return emu::to_float<T>(static_cast<uint16_t>(reg >> (16 * (k % 2)))); };
  emu::exchange(
      [&](emu::Warp& w, int l) {
        for (int i = 0; i < 4; ++i) w.regs[l][i] = a[i];
        w.regs[l][4] = b0;
        w.regs[l][5] = b1;
      },
      [&](emu::Warp& w, int l) {
        for (int e = 0; e < 4; ++e) {
          const int row = l / 4 + 8 * (e / 2), n = 2 * (l % 4) + e % 2;
          float sum = 0.f;
          for (int k = 0; k < 16; ++k) {
            const float x = element(w.regs[4 * (row % 8) + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)], k);
            const float y = element(w.regs[4 * n + (k % 8) / 2][4 + (k >= 8)], k);
            sum += x * y;
          }
          c[e] += sum;
        }
      });
}

// attention's launch(): the dynamic shared memory starts each CTA as NaN-ish garbage, as a GPU's
// might.
template <typename Kernel, typename P>
void launch(Kernel* kernel, dim3 grid, int threads, int smem_bytes, cudaStream_t, const P& p) {
  if (smem_bytes > static_cast<int>(sizeof(smem))) throw std::runtime_error("emulated shared memory is too small");
  emu::run_grid(kernel, grid, threads, [] { std::memset(smem, 0xff, sizeof(smem)); }, p);
}

}  // namespace mmkernels::attention
