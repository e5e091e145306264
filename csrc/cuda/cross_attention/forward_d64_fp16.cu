// One instantiation per file: see params.h.
#include "forward.cuh"

template void mmkernels::attention::run_forward<__half, 64>(const Params&, cudaStream_t);
