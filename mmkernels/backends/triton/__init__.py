"""The Triton backend. Importing this package does not import triton; `why_not` says whether
it can run, and `kernels` (imported on first use) holds the four kernels.

On CUDA tensors it runs compiled; on CPU tensors only under TRITON_INTERPRET=1 (set before
triton is imported) and only when asked for by name: that is how CI tests it without a GPU."""
import importlib.util
import os

import torch

from mmkernels.backends.base import Problem

MAX_HEAD_DIM = 256  # any head dim up to it: padded to the next power of two inside the kernels
MAX_MODALITIES = 8
HAVE_TRITON = importlib.util.find_spec("triton") is not None
OPS = ("cross_attention", "co_attention", "concat_weighted_fusion", "decision_fusion", "gated_fusion", "gated_residual_linear", "linear_fusion")


def why_not(p: Problem, explicit: bool) -> str | None:
    if not HAVE_TRITON:
        return "triton is not installed"
    if p.op not in OPS:
        return f"no triton {p.op} kernel in this version"
    if p.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "runs on cpu tensors only under TRITON_INTERPRET=1"
        if not explicit:
            return "the interpreter on cpu is for tests; auto never picks it"
    elif p.device.type != "cuda":
        return f"runs on cuda tensors, got {p.device.type}"
    if p.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"supports float16, bfloat16 and float32, got {p.dtype}"
    if p.op in ("cross_attention", "co_attention"):
        if not 1 <= p.head_dim <= MAX_HEAD_DIM:
            return f"supports head dims 1 to {MAX_HEAD_DIM}, got {p.head_dim}"
        if p.device.type == "cuda":
            from mmkernels.backends.triton import budgets

            block_d = max(16, 1 << (p.head_dim - 1).bit_length())
            size = torch.empty(0, dtype=p.dtype).element_size()
            for kernel in ("fwd", "dkdv", "dq"):
                if not budgets.fits(kernel, size, block_d):
                    return (f"no tile shape of its {kernel} kernel fits sm_80 and sm_90 for {p.dtype} at head dim "
                            f"{p.head_dim} (budgets.ATTENTION_FITS, measured by tools/compile_gpu.py)")
    if p.op in ("concat_weighted_fusion", "decision_fusion", "linear_fusion") and p.modalities > MAX_MODALITIES:
        return f"supports at most {MAX_MODALITIES} modalities, got {p.modalities}"
    return None
