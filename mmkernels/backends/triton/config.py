"""Launch configurations. On a GPU the attention kernels autotune over the tile shapes
budgets.py's table holds for the call's kernel, dtype, head dim, variant and the running GPU's
architecture, within its shared-memory limit (the key is the padded head dim and the flags, never
the batch or the lengths, so a new batch size does not recompile). Under TRITON_INTERPRET=1 (CPU
tensors, CI) one small configuration keeps the interpreter fast."""
import os
import threading

import torch
import triton

from mmkernels.backends import first_tensor
from mmkernels.backends.triton import budgets

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _target(device) -> tuple[str, int]:
    """(table column, shared-memory opt-in limit) of the GPU the kernel is compiled for."""
    if budgets.TARGET is not None:  # tools/compile_gpu.py, compiling for a named target
        return budgets.TARGET, budgets.TARGETS[budgets.TARGET]["max_shared"]
    from mmkernels.backends.triton import _gpu_target

    target, max_shared = _gpu_target(device.index if device.index is not None else torch.cuda.current_device())
    if target is None:
        raise RuntimeError(f"the triton attention kernels need sm_80 or newer, got {torch.cuda.get_device_capability(device)}")
    return target, max_shared


def attention_autotune(kernel: str, key):
    """triton.autotune's arguments for the attention kernel `kernel` ("fwd", "dkdv" or "dq")."""
    if INTERPRET:
        return dict(configs=[triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)], key=key)

    def fitting(configs, named_args, **kwargs):
        if budgets.CANDIDATES:  # tools/compile_gpu.py --candidates: every candidate
            return configs
        q = first_tensor(named_args.values())  # the queries (inside the first side's tuple for co_attention)
        target, max_shared = _target(q.device)
        dtype = str(q.dtype).removeprefix("torch.")
        allowed = budgets.fits(kernel, dtype, kwargs["BLOCK_D"], budgets.variant(kwargs), target, max_shared)
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
        # Timing picks the fastest, and the tile shape sets the order of the online softmax's sums:
        # deterministic mode takes the table's first shape instead, the same in every process.
        return kept[:1] if kwargs.get("DETERMINISTIC") else kept

    shapes = budgets.ATTENTION_CANDIDATES[kernel]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]
    return dict(configs=configs, key=key, prune_configs_by={"early_config_prune": fitting})


def autotune(kernel: str, key):
    """triton.autotune with attention_autotune's arguments, whose runs hold a lock: triton's
    Autotuner is not thread-safe, and two threads' first calls on a cold cache would benchmark
    and write its state at once. (Uncontended, the lock costs well under a microsecond; a run is
    a launch, so threads never wait on each other's GPU work.)"""
    decorate = triton.autotune(**attention_autotune(kernel, key))

    def wrap(fn):
        tuner = decorate(fn)
        lock = threading.Lock()

        def run(*args, **kwargs):
            with lock:  # type(tuner).run, not a bound copy: tools/compile_gpu.py patches it on the class
                return type(tuner).run(tuner, *args, **kwargs)

        tuner.run = run
        return tuner

    return wrap


def fusion_config():
    """(rows per program, columns per step, warps)."""
    return (4, 32, 1) if INTERPRET else (16, 128, 4)
