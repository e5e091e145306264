"""Backend choice, with reasons.

A backend is a family of kernels with its own device rules: `reference` (PyTorch composites,
any device), `cpu` and `cuda` (the C++ operators), `triton`. Which ops a backend runs, and on
what inputs, is declared per op in its OpSpec (mmkernels/spec.py); `why_not(name, problem,
explicit)` joins the backend's own rules with that table and gives every failing reason. The
choice, in order of precedence: the `backend=` argument, then `use_backend(...)`, then the
MMKERNELS_BACKEND environment variable, then "auto", which takes the first backend of AUTO_ORDER
that can run the inputs. A named backend that can't run them raises BackendUnavailable with its
reasons and the backends that could.
"""
import contextlib
import contextvars
import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from mmkernels import spec as specs
from mmkernels.backends import native, reference
from mmkernels.backends.base import Problem

AUTO_ORDER = ("cuda", "triton", "cpu", "reference")
ENV_VAR = "MMKERNELS_BACKEND"


class BackendUnavailable(RuntimeError):
    """The requested backend can't run these inputs; the message says why."""


@dataclass(frozen=True)
class Backend:
    name: str
    devices: str  # for people: where it runs
    rules: Callable[[Problem, bool], list[str]]  # why not, whatever the op
    module: Callable[[str], ModuleType]  # op name -> the module with its kernels, imported on first use


def _triton_rules(p: Problem, explicit: bool) -> list[str]:
    from mmkernels.backends import triton

    return triton.rules(p, explicit)


BACKENDS = {
    "cuda": Backend("cuda", "cuda", native.cuda_rules, lambda op: native),
    "triton": Backend("triton", "cuda, or cpu under TRITON_INTERPRET=1", _triton_rules,
                      lambda op: importlib.import_module(f"mmkernels.backends.triton.{op}")),
    "cpu": Backend("cpu", "cpu", native.cpu_rules, lambda op: native),
    "reference": Backend("reference", "any", lambda p, explicit: [], lambda op: reference),
}


def why_not(name: str, p: Problem, explicit: bool = False) -> str | None:
    """None if backend `name` can run Problem p, else every reason it can't, joined by '; '."""
    why = BACKENDS[name].rules(p, explicit)
    capability = specs.SPECS[p.op].backends.get(name) if p.op in specs.SPECS else None
    if capability is None:
        why.append(f"no {name} {p.op} kernel in this version")
    else:
        why += capability.reasons(p, explicit)
    return "; ".join(why) or None


def kernel(backend: str, name: str) -> Callable:
    """Backend's kernel `name` (an op, or <op>_backward). Triton's run under their inputs' device.
    Looked up on every call, not cached, so that a patched module attribute is what runs."""
    fn = getattr(BACKENDS[backend].module(name.removesuffix("_backward")), name)
    return _on_inputs_device(fn) if backend == "triton" else fn


def tensors(args):
    """The tensors among an op's arguments, the items of its lists and tuples (features,
    co_attention's sides) included."""
    import torch

    for a in args:
        for t in (a if type(a) in (list, tuple) else (a,)):
            if isinstance(t, torch.Tensor):
                yield t


def first_tensor(args):
    """The first of tensors(args); None if none."""
    return next(tensors(args), None)


@functools.lru_cache(maxsize=None)
def _on_inputs_device(fn: Callable) -> Callable:
    """Triton launches on torch's current device and its current stream, whatever device the
    tensors are on: tensors on cuda:1 while cuda:0 is current would fail, or with peer access run
    on the wrong GPU unordered with the stream that made them (a model spread over GPUs by
    device_map="auto" does exactly this). The C++ kernels have their own device guard."""
    import torch

    @functools.wraps(fn)
    def run(*args, **kwargs):
        t = first_tensor(args)
        if t is None or t.device.type != "cuda" or t.device.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(t.device):
            return fn(*args, **kwargs)

    return run


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
    return _check_name(_environment(ENV_VAR) or "auto", ENV_VAR)


def _environment(name: str) -> str | None:
    """os.environ.get(name), without its KeyError when unset (most calls, and costlier than a
    small kernel's launch): os.environ keeps its values in _data, encoded, on POSIX."""
    data = getattr(os.environ, "_data", None)
    if data is None or os.name != "posix":
        return os.environ.get(name)
    value = data.get(name.encode())
    return None if value is None else os.fsdecode(value)


def reasons(p: Problem, explicit: bool = False) -> dict[str, str | None]:
    """For every backend: None if it can run the problem, else why not."""
    return {name: why_not(name, p, explicit) for name in BACKENDS}


@functools.lru_cache(maxsize=1024)
def _auto(p: Problem) -> str:
    """auto's pick for p. Cached: the answer depends only on p and on what this process has
    (the specs, the build, triton), and every call of an op asks it, so its refusal messages
    are written once per kind of input, not once per call."""
    for candidate in AUTO_ORDER:
        if why_not(candidate, p, False) is None:
            return candidate
    raise BackendUnavailable(f"no backend can run {p.op} on {p}: {reasons(p)}")


def choose(p: Problem, backend: str = "") -> str:
    name = requested(backend)
    if name == "auto":
        return _auto(p)
    why = why_not(name, p, True)
    if why is not None:
        able = [n for n, r in reasons(p).items() if r is None]
        raise BackendUnavailable(
            f"backend {name!r} can't run {p.op} on {p.device.type} {p.dtype}: {why}. "
            f"Backends that can: {able}"
        )
    return name


def available_backends(device: str = "cpu") -> list[str]:
    """Backends that can run some op on float32 inputs on `device` when named explicitly."""
    import torch

    dev = torch.device(device)
    probes = [Problem(op, dev, torch.float32, head_dim=64, modalities=2) for op in specs.SPECS]
    return [name for name in BACKENDS if any(why_not(name, p, True) is None for p in probes)]
