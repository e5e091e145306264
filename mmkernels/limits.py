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

# Their tiles, per kernel and head dim: query rows (dK/dV: of one step) and keys per CTA, warps,
# pipeline stages and dynamic shared memory. The kernels static_assert them; the compile gate
# (tools/compile_gpu.py) reports them; the host checks shared_bytes against the running GPU.
CUDA_ATTENTION_TILES = {
    "fwd": {64: dict(block_m=128, block_n=64, warps=8, stages=2, shared_bytes=50304),
            128: dict(block_m=128, block_n=64, warps=8, stages=2, shared_bytes=99456)},
    "dkdv": {64: dict(block_m=64, block_n=64, warps=4, stages=2, shared_bytes=51200),
             128: dict(block_m=32, block_n=64, warps=4, stages=2, shared_bytes=66560)},
    "dq": {64: dict(block_m=64, block_n=64, warps=4, stages=2, shared_bytes=49792),
           128: dict(block_m=64, block_n=64, warps=4, stages=2, shared_bytes=98944)},
}

# Triton attention pads any head dim up to this to the next power of two.
TRITON_MAX_HEAD_DIM = 256
