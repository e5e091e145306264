// One instantiation per file: see params.h.
#include "backward.cuh"

template void mmkernels::attention::run_backward<__half, 64>(const Params&, cudaStream_t);
