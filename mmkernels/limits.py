"""The numbers more than one backend must agree on, in one place.

Plain Python with no imports, so that tools/gen_headers.py can write them into csrc/limits.h for
the C++ and CUDA kernels (a test fails when that header is stale): a limit changed here reaches
every backend, or CI says which file to regenerate.
"""

# Fusion kernels pass one pointer per modality (Triton can't index a list of pointers; the CUDA
# kernel keeps them in a fixed-size argument struct), so the modality count has a ceiling.
MAX_MODALITIES = 8

# The weight gradient of concat_weighted_fusion sums dlogits^T @ features over row chunks of this
# size, in order: the reduction order never depends on threads or the launch shape.
WEIGHT_GRAD_CHUNK = 8192

# linear_fusion's activation travels to the kernels as an index into this tuple.
ACTIVATIONS = (None, "relu", "gelu", "silu", "tanh", "sigmoid")

# The tensor-core CUDA attention kernels are instantiated for these head dims (csrc/cuda/cross_attention).
CUDA_ATTENTION_HEAD_DIMS = (64, 128)

# Triton attention pads any head dim up to this to the next power of two.
TRITON_MAX_HEAD_DIM = 256
