"""Launch configurations. On a GPU the attention kernels autotune over a few tile shapes (the
key is the padded head dim and which masks are loaded, never the batch or the lengths, so a new
batch size does not recompile), pruned before any is tried to those that fit the GPUs we target
without spilling: budgets.ATTENTION_FITS, measured by tools/compile_gpu.py. Under
TRITON_INTERPRET=1 (CPU tensors, CI) one small configuration keeps the interpreter fast."""
import os

import triton

from mmkernels.backends.triton import budgets

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _operand_bytes(named_args) -> int:
    """The element size of the first tensor argument, the queries (inside the first side's tuple
    for co_attention)."""
    flat = (t for a in named_args.values() for t in (a if isinstance(a, tuple) else (a,)))
    return next(t for t in flat if hasattr(t, "element_size")).element_size()


def attention_autotune(kernel: str, key):
    """triton.autotune's arguments for the attention kernel `kernel` ("fwd", "dkdv" or "dq")."""
    if INTERPRET:
        return dict(configs=[triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)], key=key)

    def fitting(configs, named_args, **kwargs):
        allowed = budgets.fits(kernel, _operand_bytes(named_args), kwargs["BLOCK_D"])
        if allowed is None:  # tools/compile_gpu.py --candidates: every candidate
            return configs
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]

    shapes = budgets.ATTENTION_CANDIDATES["fwd" if kernel == "fwd" else "bwd"]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]
    return dict(configs=configs, key=key, prune_configs_by={"early_config_prune": fitting})


def fusion_config():
    """(rows per program, columns per step, warps)."""
    return (4, 32, 1) if INTERPRET else (16, 128, 4)
