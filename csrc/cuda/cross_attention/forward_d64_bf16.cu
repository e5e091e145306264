// One instantiation per file: see params.h.
#include "forward.cuh"

template void mmkernels::attention::run_forward<__nv_bfloat16, 64>(const Params&, cudaStream_t);
