"""Launch configurations. On a GPU the kernels autotune over a few tile shapes (the key is the
padded head dim and whether a key mask is loaded, never the batch or the lengths, so a new
batch size does not recompile). Under TRITON_INTERPRET=1 (CPU tensors, CI) one small
configuration keeps the interpreter fast."""
import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def attention_configs(direction: str):
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    if direction == "fwd":
        shapes = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)]
    else:
        shapes = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def fusion_config():
    """(rows per program, columns per step, warps)."""
    return (4, 32, 1) if INTERPRET else (16, 128, 4)
