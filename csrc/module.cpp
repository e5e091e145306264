// The Python extension module mmkernels._C: build facts only. Loading it runs the static
// registrations of ops.cpp and the kernels, which is what puts the operators in torch.ops.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "isa.h"

#include <atomic>
#include <string>
#include <vector>

#ifndef MMKERNELS_VERSION
#define MMKERNELS_VERSION "0.0.0"
#endif

#define MMKERNELS_STR2(...) #__VA_ARGS__
#define MMKERNELS_STR(...) MMKERNELS_STR2(__VA_ARGS__)

namespace {

// How many threads an at::parallel_for in this extension really runs on. It is header code
// that parallelises through `#pragma omp parallel`, so a build without OpenMP silently runs every
// CPU kernel on one thread; this reports it (mmkernels info, and a test).
int parallel_threads() {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) { seen |= uint64_t(1) << (at::get_thread_num() % 64); });
  return __builtin_popcountll(seen.load());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmkernels compiled kernels; operators live in torch.ops.mmkernels";
  m.attr("__version__") = MMKERNELS_VERSION;
  m.def("parallel_threads", &parallel_threads, "threads an at::parallel_for of this extension runs on");
  m.attr("torch_version") = MMKERNELS_STR(MMKERNELS_TORCH_VERSION);
  m.def("cpu_isa", &mmkernels::cpu_isa, "the instruction set whose CPU kernels the operators run (ATEN_CPU_CAPABILITY picks)");
#ifdef MMKERNELS_WITH_CUDA
  m.attr("cuda_version") = MMKERNELS_STR(MMKERNELS_CUDA_VERSION);
  m.attr("cuda_archs") = MMKERNELS_STR(MMKERNELS_CUDA_ARCHS);
  m.attr("compiled_backends") = std::vector<std::string>{"cpu", "cuda"};
#else
  m.attr("cuda_version") = pybind11::none();
  m.attr("cuda_archs") = "";
  m.attr("compiled_backends") = std::vector<std::string>{"cpu"};
#endif
}
