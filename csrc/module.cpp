// The Python extension module mmkernels._C: build facts only. Loading it runs the static
// registrations of ops.cpp and the kernels, which is what puts the operators in torch.ops.
#include <torch/extension.h>

#include <string>
#include <vector>

#ifndef MMKERNELS_VERSION
#define MMKERNELS_VERSION "0.0.0"
#endif

#define MMKERNELS_STR2(...) #__VA_ARGS__
#define MMKERNELS_STR(...) MMKERNELS_STR2(__VA_ARGS__)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmkernels compiled kernels; operators live in torch.ops.mmkernels";
  m.attr("__version__") = MMKERNELS_VERSION;
  m.attr("torch_version") = MMKERNELS_STR(MMKERNELS_TORCH_VERSION);
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
