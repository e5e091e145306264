// Which instruction set's CPU kernels the operators run.
//
// Every source under csrc/cpu/ is compiled once per instruction set, as ATen compiles its own
// kernels: DEFAULT (baseline x86-64, or any other CPU), AVX2 (with FMA and F16C) and AVX512 (F,
// BW, VL, DQ), each with CPU_CAPABILITY naming the set (setup.py, CMakeLists.txt), so that
// at::vec::Vectorized is that set's width and every symbol of that copy lives in its own
// namespace. The rest of the library is built for baseline x86-64 and loads on any x86-64 CPU.
// At load each copy offers its kernels, and the one of the set ATen dispatches its own kernels
// to (the best the CPU has, or what ATEN_CPU_CAPABILITY asks for) is registered.
#pragma once

#include <torch/library.h>

#include <cstdint>
#include <string>

// The instruction set a kernel source is being compiled for, as a string ("AVX2").
#define MMKERNELS_ISA_STR2(x) #x
#define MMKERNELS_ISA_STR(x) MMKERNELS_ISA_STR2(x)
#define MMKERNELS_ISA_NAME MMKERNELS_ISA_STR(CPU_CAPABILITY)

namespace mmkernels {

// "AVX512", "AVX2" or "DEFAULT": the set whose kernels the operators run in this process.
const std::string& cpu_isa();

// Calls define(m) on a CPU implementation library of the mmkernels operators if `isa` is
// cpu_isa(); returns whether it did. Each kernel source calls it once, at load.
bool register_cpu_kernels(const char* isa, void (*define)(torch::Library&), const char* file, uint32_t line);

}  // namespace mmkernels
