"""The Triton backend: one module per op (triton/<op>.py) holding its kernels. Importing this
package does not import triton; `rules` says whether it can run at all, and the ops' specs
(mmkernels/spec.py) say what each kernel takes.

On CUDA tensors it runs compiled; on CPU tensors only under TRITON_INTERPRET=1 (set before
triton is imported) and only when asked for by name: that is how CI tests it without a GPU."""
import importlib.util
import os

import torch

from mmkernels.backends.base import Problem

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
    measured by tools/compile_gpu.py --candidates)."""
    if p.device.type != "cuda":
        return None
    from mmkernels.backends.triton import budgets

    return budgets.claimed(str(p.dtype).removeprefix("torch."), max(16, 1 << (p.head_dim - 1).bit_length()))
