"""What the Triton kernels may use on the GPUs we target, and what tools/compile_gpu.py checks.

Shared memory: the most one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
Spills: at most 64 bytes per thread of local memory. That admits the few registers ptxas saves
around a loop (8-56 B in the kernels here, hit in L1) and fails what spilling tiles cost: the
1-100 KB per thread this gate found before the kernels were fixed. The attention tile table
below is stricter: its shapes were measured with zero spills. (The local-memory count also
includes stack frames, which these kernels do not use.)"""
TARGETS = {
    "sm_80": {"arch": 80, "max_shared": 166_912},  # A100
    "sm_90": {"arch": 90, "max_shared": 232_448},  # H100 / H200
}
SPILL_BYTES = 64

# What compile_gpu.py compiles. Quick (CI): the worst case of each kernel (every mask flag,
# causal and dropout on), at each padded head dim the kernels are built for, and the largest
# modality count. Full: also the plain variant and the smallest modality count.
QUICK = {"dtypes": ["float16", "float32"], "head_dims": [64, 128, 256], "variants": ["all-masks"], "modalities": [8]}
FULL = {"dtypes": ["float16", "bfloat16", "float32"], "head_dims": [16, 32, 64, 128, 256], "variants": ["all-masks", "plain"],
        "modalities": [2, 8]}

# Tile shapes the attention kernels may autotune over: (BLOCK_M, BLOCK_N, warps, stages).
ATTENTION_CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 4, 1)],
    "bwd": [(64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
}

# (kernel, operand bytes, padded head dim) -> the candidates that fit every target above within
# the spill budget, as `tools/compile_gpu.py --candidates` measured them (worst case: every
# mask, causal and dropout). A (dtype, head dim) with no entry is not claimed: the triton
# backend refuses it and says so.
ATTENTION_FITS = {  # measured 2026-11-30, triton 3.8.0, commit after 10b8053
    ('dkdv', 2, 16): [(64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 4, 1)],
    ('dkdv', 2, 32): [(16, 32, 4, 1), (16, 16, 4, 1)],
    ('dkdv', 2, 64): [(32, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
    ('dkdv', 2, 128): [(16, 32, 4, 1), (16, 16, 4, 1)],
    ('dkdv', 2, 256): [],
    ('dkdv', 4, 16): [(16, 32, 4, 1), (16, 16, 4, 1)],
    ('dkdv', 4, 32): [(16, 32, 4, 1), (16, 16, 4, 1)],
    ('dkdv', 4, 64): [(16, 32, 4, 1), (16, 16, 4, 1)],
    ('dkdv', 4, 128): [(16, 16, 4, 1)],
    ('dkdv', 4, 256): [],
    ('dq', 2, 16): [(64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
    ('dq', 2, 32): [(64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
    ('dq', 2, 64): [(32, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
    ('dq', 2, 128): [(32, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
    ('dq', 2, 256): [(16, 32, 4, 1), (16, 16, 4, 1)],
    ('dq', 4, 16): [(64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
    ('dq', 4, 32): [(32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
    ('dq', 4, 64): [(16, 32, 4, 1), (16, 16, 4, 1)],
    ('dq', 4, 128): [],
    ('dq', 4, 256): [],
    ('fwd', 2, 16): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 4, 1)],
    ('fwd', 2, 32): [(128, 32, 8, 3), (64, 32, 4, 3), (32, 32, 4, 2), (16, 16, 4, 1)],
    ('fwd', 2, 64): [(128, 32, 8, 3), (64, 32, 4, 3), (32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 4, 1)],
    ('fwd', 2, 128): [(32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 4, 1)],
    ('fwd', 2, 256): [(16, 32, 4, 2), (16, 16, 4, 1)],
    ('fwd', 4, 16): [(32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 4, 1)],
    ('fwd', 4, 32): [(32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 4, 1)],
    ('fwd', 4, 64): [(16, 32, 4, 2), (16, 16, 4, 1)],
    ('fwd', 4, 128): [],
    ('fwd', 4, 256): [],
}

CANDIDATES = False  # tools/compile_gpu.py --candidates sets it: no pruning


def fits(kernel: str, operand_bytes: int, block_d: int):
    """The allowed tile shapes, or None for "every candidate" (while measuring them)."""
    if CANDIDATES:
        return None
    return ATTENTION_FITS.get((kernel, operand_bytes, block_d), ())
