// How the CPU kernels share work among threads.
//
// at::parallel_for hands every thread an equal, fixed share. When another process holds one of
// the cores, the thread that shares it runs at a fraction of its speed and the whole call waits
// for its share. Here the threads take tasks one at a time from a shared counter, so a thread
// that is slowed down simply takes fewer of them: one parallel region per call, no barrier per
// task, no nested parallelism. Which thread runs a task never changes what the task computes,
// so results stay bitwise reproducible.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#ifndef CPU_CAPABILITY
#error "the CPU kernels are compiled once per instruction set, named by CPU_CAPABILITY (csrc/isa.h)"
#endif

// Each instruction set's copy has its own symbols (csrc/isa.h), as ATen's at::vec does.
namespace mmkernels::cpu::inline CPU_CAPABILITY {

// A call with less work than this per thread (multiply-adds) runs on fewer threads: waking a
// thread costs microseconds when the core is idle and far more when another process holds it,
// which is what made small attention calls (a decoding step, a tiny layer) slower than their work.
constexpr int64_t kWorkPerThread = int64_t(1) << 17;

// Calls body(task, state) for every task in [0, n), each exactly once. make_state() builds one
// thread's scratch (buffers) once per thread and call. work: the call's multiply-adds, if known,
// so that a small call runs on as many threads as its work is worth (one, inline, for the smallest).
template <typename MakeState, typename Body>
void for_each_task(int64_t n, MakeState&& make_state, Body&& body, int64_t work = -1) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  if (work >= 0) workers = std::clamp<int64_t>(work / kWorkPerThread, 1, workers);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t task = next.fetch_add(1, std::memory_order_relaxed); task < n;
         task = next.fetch_add(1, std::memory_order_relaxed)) {
      body(task, state);
    }
  });
}

// Row-parallel loops in chunks of `grain` rows, scheduled as tasks.
template <typename MakeState, typename Body>
void for_each_chunk(int64_t rows, int64_t grain, MakeState&& make_state, Body&& body) {
  const int64_t chunks = (rows + grain - 1) / grain;
  for_each_task(chunks, make_state, [&](int64_t c, auto& state) {
    body(c * grain, std::min(rows, (c + 1) * grain), state);
  });
}

}  // namespace mmkernels::cpu::inline CPU_CAPABILITY
