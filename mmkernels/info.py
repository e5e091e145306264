"""Build facts of the compiled extension and what is usable at run time."""
import importlib.util
import os

import torch

from mmkernels import _C
from mmkernels.backends import available_backends


def usable_device(value, name: str = "device") -> torch.device:
    """value as a torch.device that can run here, or InvalidInput naming the argument `name`."""
    from mmkernels.ops.checks import fail

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        fail(f"{name} must be 'cpu' or 'cuda' (or 'cuda:N'), got {value!r}")
    if device.type not in ("cpu", "cuda"):
        fail(f"{name} must be 'cpu' or 'cuda' (or 'cuda:N'), got {value!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"{name} {value!r} was asked for, but no GPU is usable here: torch.cuda.is_available() is False "
             f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        fail(f"{name} {value!r}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def info() -> dict:
    cuda_ok = torch.cuda.is_available()
    triton_ok = importlib.util.find_spec("triton") is not None
    facts = {
        "mmkernels": _C.__version__,
        "built_with_torch": _C.torch_version,
        "built_with_cuda": _C.cuda_version,
        "compiled_backends": list(_C.compiled_backends),
        "cuda_archs": _C.cuda_archs,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if cuda_ok else None,
        "triton": importlib.import_module("triton").__version__ if triton_ok else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "cpu_threads": f"{_C.parallel_threads()} of {torch.get_num_threads()}",
        "cpu_kernels": _C.cpu_isa(),  # the instruction set whose CPU kernels run (ATEN_CPU_CAPABILITY lowers it)
        "backends_cpu": available_backends("cpu"),
    }
    if cuda_ok:
        facts["backends_cuda"] = available_backends("cuda")
    return facts


def format_info(facts: dict | None = None) -> str:
    facts = info() if facts is None else facts
    width = max(map(len, facts))
    return "\n".join(f"{k:<{width}}  {v}" for k, v in facts.items())
