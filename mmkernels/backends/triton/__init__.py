"""The Triton backend: one module per op (triton/<op>.py) holding its kernels. Importing this
package does not import triton; `rules` says whether it can run at all, and the ops' specs
(mmkernels/spec.py) say what each kernel takes.

On CUDA tensors it runs compiled; on CPU tensors only under TRITON_INTERPRET=1 (set before
triton is imported) and only when asked for by name: that is how CI tests it without a GPU."""
import functools
import importlib.util
import os

import torch

from mmkernels.backends.base import Problem, gpu_index

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def rules(p: Problem, explicit: bool) -> list[str]:
    if not HAVE_TRITON:
        return ["triton is not installed"]
    if p.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ["runs on cpu tensors only under TRITON_INTERPRET=1"]
        if not explicit:
            return ["the interpreter on cpu is for tests; auto never picks it"]
    elif p.device.type != "cuda":
        return [f"runs on cuda tensors, got {p.device.type}"]
    return []


def attention_fits(p: Problem) -> str | None:
    """On a GPU, the attention kernels take a (dtype, head dim) only where every kernel has a tile
    shape for every variant on sm_80 and sm_90 that compiles within budget (budgets.py's table,
    measured by tools/compile_gpu.py --candidates), and, on the GPU at hand, one within the
    shared memory a block may use there (a 9.x-or-newer GPU with less than an H100 reads the
    sm_90 column: without this check the autotuner would be left no config at launch)."""
    if p.device.type != "cuda":
        return None
    from mmkernels.backends.triton import budgets

    dtype, block_d = str(p.dtype).removeprefix("torch."), max(16, 1 << (p.head_dim - 1).bit_length())
    why = budgets.claimed(dtype, block_d)
    if why is not None or (index := gpu_index(p.device)) is None:
        return why
    target, max_shared = _gpu_target(index)
    if target is None:
        return "the triton attention kernels need sm_80 or newer"
    for kernel in budgets.ATTENTION_CANDIDATES:
        for variant in budgets.VARIANTS:
            if not budgets.fits(kernel, dtype, block_d, variant, target, max_shared):
                return (f"no tile shape of its {kernel} kernel with {variant} visibility fits the {max_shared} B of shared "
                        f"memory a block may use on this GPU, for {dtype} at padded head dim {block_d}")
    return None


@functools.lru_cache(maxsize=None)
def _gpu_target(index: int) -> tuple[str | None, int]:
    """(tile table column, shared-memory opt-in limit) of GPU `index`."""
    from mmkernels.backends.triton import budgets

    props = torch.cuda.get_device_properties(index)
    return budgets.target_of((props.major, props.minor)), props.shared_memory_per_block_optin
