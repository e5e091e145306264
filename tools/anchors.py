"""Triton's tutorial fused attention (tests/assets/triton_06_fused_attention.py, vendored with its
origin and license), launched as the gate launches ours: its host code runs on CPU tensors with
Triton's launch entry points recorded, as if on a GPU of the named architecture. Its kernels are
the anchors of the efficiency table: the same compiler, the same target, the same measures."""
import contextlib
import importlib.util
import os
import types

import torch
import triton
from triton.backends.compiler import GPUTarget

TUTORIAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "assets",
                        "triton_06_fused_attention.py")


class _Driver:
    """What the tutorial asks of Triton's active driver, for a GPU that is not here."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)


@contextlib.contextmanager
def pretend_gpu(arch: int):
    """The tutorial reads the device capability and Triton's driver at import and at launch."""
    driver, capability = triton.runtime.driver, torch.cuda.get_device_capability
    saved = driver._active
    driver._active = _Driver(arch)
    torch.cuda.get_device_capability = lambda *args: (arch // 10, arch % 10)
    try:
        yield
    finally:
        driver._active, torch.cuda.get_device_capability = saved, capability


def _load(arch: int):
    with pretend_gpu(arch):
        spec = importlib.util.spec_from_file_location(f"triton_tutorial_sm{arch}", TUTORIAL)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def cases(arch: int, head_dims):
    """(name, run) pairs for compile_gpu.capture: the tutorial's forward (TMA on sm_90, as it runs
    there) and backward, fp16 (its kernels cast P to fp16), B1 H2 N_CTX 256."""
    tutorial = _load(arch)
    for D in head_dims:
        q = torch.randn(1, 2, 256, D, dtype=torch.float16)
        k, v = torch.randn_like(q), torch.randn_like(q)
        ctx = types.SimpleNamespace()
        ctx.save_for_backward = lambda *t, ctx=ctx: setattr(ctx, "saved_tensors", t)

        def run(q=q, k=k, v=v, ctx=ctx):
            with pretend_gpu(arch):
                tutorial._attention.forward(ctx, q, k, v, False, 0.5, arch >= 90)
                tutorial._attention.backward(ctx, torch.randn_like(q))

        yield f"tutorial float16 hd{D}", run
