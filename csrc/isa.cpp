// Chooses the CPU kernels' instruction set (isa.h). Built for baseline x86-64.
#include "isa.h"

#include <ATen/Version.h>

#include <memory>
#include <vector>

namespace mmkernels {

namespace {

// The sets this build has kernels for, best first (setup.py and CMakeLists.txt build the same).
#if defined(__x86_64__) || defined(_M_X64)
const char* const kBuilt[] = {"AVX512", "AVX2", "DEFAULT"};
#else
const char* const kBuilt[] = {"DEFAULT"};
#endif

}  // namespace

const std::string& cpu_isa() {
  // ATen's choice honours ATEN_CPU_CAPABILITY and never exceeds what the CPU has.
  static const std::string chosen = [] {
    const std::string aten = at::get_cpu_capability();
    for (const char* built : kBuilt) {
      if (aten == built) return aten;
    }
    return std::string("DEFAULT");
  }();
  return chosen;
}

bool register_cpu_kernels(const char* isa, void (*define)(torch::Library&), const char* file, uint32_t line) {
  if (cpu_isa() != isa) return false;
  // What TORCH_LIBRARY_IMPL keeps in a static, kept here: the registration lasts as long as the library.
  static std::vector<std::unique_ptr<torch::Library>> libraries;
  libraries.push_back(std::make_unique<torch::Library>(torch::Library::IMPL, "mmkernels", c10::DispatchKey::CPU, file, line));
  define(*libraries.back());
  return true;
}

}  // namespace mmkernels
