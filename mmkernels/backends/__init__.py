"""Backend choice, with reasons.

Every backend implements the same four kernels (cross_attention and concat_weighted_fusion,
forward and backward) and answers `why_not(problem, explicit)`: None when it can run the
inputs, else the reason it can't. The choice, in order of precedence: the `backend=` argument,
then `use_backend(...)`, then the MMKERNELS_BACKEND environment variable, then "auto", which
takes the first backend of AUTO_ORDER that can run the inputs. A named backend that can't run
them raises BackendUnavailable with its reason and the backends that could.
"""
import contextlib
import contextvars
import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from mmkernels.backends import native, reference
from mmkernels.backends.base import Problem

AUTO_ORDER = ("cuda", "triton", "cpu", "reference")
ENV_VAR = "MMKERNELS_BACKEND"


class BackendUnavailable(RuntimeError):
    """The requested backend can't run these inputs; the message says why."""


@dataclass(frozen=True)
class Backend:
    name: str
    why_not: Callable[[Problem, bool], str | None]
    load: Callable[[], ModuleType]  # the module with the four kernels, imported on first use


def _triton_why_not(p: Problem, explicit: bool) -> str | None:
    from mmkernels.backends.triton import why_not

    return why_not(p, explicit)


BACKENDS = {
    "cuda": Backend("cuda", native.why_not_cuda, lambda: native),
    "triton": Backend("triton", _triton_why_not, lambda: importlib.import_module("mmkernels.backends.triton.kernels")),
    "cpu": Backend("cpu", native.why_not_cpu, lambda: native),
    "reference": Backend("reference", lambda p, explicit: None, lambda: reference),
}

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("mmkernels_backend", default=None)


def _check_name(name: str, where: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{where} must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Forces a backend for the calls inside the block (unless a call names its own)."""
    token = _forced.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _forced.reset(token)


def requested(backend: str) -> str:
    """The backend asked for: the argument if given, else the context, else the env var."""
    if backend:
        return _check_name(backend, "backend")
    if _forced.get() is not None:
        return _forced.get()
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)


def reasons(p: Problem, explicit: bool = False) -> dict[str, str | None]:
    """For every backend: None if it can run the problem, else why not."""
    return {name: b.why_not(p, explicit) for name, b in BACKENDS.items()}


def choose(p: Problem, backend: str = "") -> str:
    name = requested(backend)
    if name == "auto":
        for candidate in AUTO_ORDER:
            if BACKENDS[candidate].why_not(p, False) is None:
                return candidate
        raise BackendUnavailable(f"no backend can run {p.op} on {p}: {reasons(p)}")
    why = BACKENDS[name].why_not(p, True)
    if why is not None:
        able = [n for n, r in reasons(p).items() if r is None]
        raise BackendUnavailable(
            f"backend {name!r} can't run {p.op} on {p.device.type} {p.dtype}: {why}. "
            f"Backends that can: {able}"
        )
    return name


def kernels(name: str) -> ModuleType:
    return BACKENDS[name].load()


def available_backends(device: str = "cpu") -> list[str]:
    """Backends that can run a float32 problem on `device` (named explicitly)."""
    import torch

    available = []
    for name, b in BACKENDS.items():
        probes = [Problem(op, torch.device(device), torch.float32, 64, 2) for op in ("cross_attention", "concat_weighted_fusion")]
        if any(b.why_not(p, True) is None for p in probes):
            available.append(name)
    return available
