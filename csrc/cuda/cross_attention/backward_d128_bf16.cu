// One instantiation per file: see params.h.
#include "backward.cuh"

template void mmkernels::attention::run_backward<__nv_bfloat16, 128>(const Params&, cudaStream_t);
