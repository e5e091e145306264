"""Argument checks and helpers shared by the ops. Every message names the argument, what was
expected and what came. Checks of shapes, dtypes and devices run where the op is called (also
while torch.compile traces); checks of tensor *values* (lengths in range) run in the op itself,
on real tensors, and only where they are free: on CPU tensors (values_free). On a GPU they would
cost a device-to-host sync per call, stalling pipelines and CUDA graphs, so there the kernels
clamp out-of-range lengths instead (as they always do, so a skipped check is never unsafe);
MMKERNELS_CHECK_VALUES=1 turns the checks on everywhere, for debugging, at that cost."""
import math
import os

import torch
from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor

from mmkernels.spec import FLOATS as FLOAT_DTYPES

CHECK_VALUES_ENV = "MMKERNELS_CHECK_VALUES"
FREE_DEVICES = ("cpu",)  # where reading a value on the host costs no device sync
INDEX_DTYPES = (torch.int32, torch.int64)


class InvalidInput(ValueError, RuntimeError):
    """Bad arguments to an mmkernels function or operator. Both a ValueError (what the functions
    have always raised) and a RuntimeError (what torch operators raise, as the C++ kernels do)."""


def fail(message: str):
    raise InvalidInput(message)


def is_fake(t) -> bool:
    """A tensor without data (torch.compile's fake tensors, meta tensors): only its metadata can
    be checked."""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:  # the common case, without is_fake's unwrapping
        return t.is_meta
    return isinstance(t, torch.Tensor) and (t.is_meta or torch._subclasses.fake_tensor.is_fake(t))


def check_float(name: str, t):
    if not isinstance(t, torch.Tensor):
        fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        fail(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_like(name: str, t, ref_name: str, ref):
    """Same dtype and device as ref."""
    check_float(name, t)
    if t.dtype != ref.dtype or t.device != ref.device:
        fail(f"{name} must have {ref_name}'s dtype and device ({ref.dtype} on {ref.device}), got {t.dtype} on {t.device}")


def check_bias(name: str, bias, size: int, ref_name: str, ref):
    """None, or a (size,) vector with ref's dtype and device."""
    if bias is None:
        return
    check_like(name, bias, ref_name, ref)
    if tuple(bias.shape) != (size,):
        fail(f"{name} must have shape ({size},), got {tuple(bias.shape)}")


def check_tensor_list(name: str, tensors) -> tuple:
    """A non-empty list of float tensors with the dtype, device and leading dims of the first;
    returns those leading dims."""
    if not isinstance(tensors, (list, tuple)) or len(tensors) == 0:
        fail(f"{name} must be a non-empty list of tensors, got {type(tensors).__name__} of length {len(tensors) if isinstance(tensors, (list, tuple)) else 'n/a'}")
    check_float(f"{name}[0]", tensors[0])
    if tensors[0].dim() == 0:
        fail(f"{name}[0] must have a last (feature) dim, (..., D), got a 0-d tensor")
    lead = tuple(tensors[0].shape[:-1])
    for i, t in enumerate(tensors):
        check_like(f"{name}[{i}]", t, f"{name}[0]", tensors[0])
        if tuple(t.shape[:-1]) != lead:
            fail(f"{name}[{i}] must have the leading dims {lead} of {name}[0], got shape {tuple(t.shape)}")
    return lead


def check_last_dim_contiguous(name: str, t):
    if t.numel() and t.shape[-1] > 1 and t.stride(-1) != 1:  # an empty tensor has no layout to keep
        fail(f"{name} must have a contiguous last dim (stride 1), got strides {tuple(t.stride())}; "
             "a transposed view such as x.transpose(1, 2) is fine, a transposed last dim is not")


def check_index(name: str, t, ref_name: str, ref, batch: int):
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype not in INDEX_DTYPES or t.device != ref.device:
        got = f"{t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        fail(f"{name} must be int32 or int64 on {ref_name}'s device ({ref.device}), got {got}")
    if tuple(t.shape) != (batch,):
        fail(f"{name} must have shape ({batch},), got {tuple(t.shape)}")


def check_rows_index(name: str, t, ref_name: str, ref, batch: int, rows: int):
    """None, or an int32/int64 (batch, rows) tensor on ref's device (per-row key ranges)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype not in INDEX_DTYPES or t.device != ref.device:
        got = f"{t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        fail(f"{name} must be int32 or int64 on {ref_name}'s device ({ref.device}), got {got}")
    if tuple(t.shape) != (batch, rows):
        fail(f"{name} must have shape (B, Lq) = ({batch}, {rows}), got {tuple(t.shape)}")


def values_free(t) -> bool:
    """Whether the ops may read t's values on the host: free for a CPU tensor; a device-to-host
    sync for any other, done only under MMKERNELS_CHECK_VALUES=1. Never while tracing."""
    if t is None or torch.compiler.is_compiling() or is_fake(t):
        return False
    return t.device.type in FREE_DEVICES or os.environ.get(CHECK_VALUES_ENV) == "1"


def every_sample(t):
    """t's values for a check: under torch.func.vmap, those of every sample (a batched tensor's
    values cannot decide a branch), the tensor itself elsewhere."""
    while not torch.compiler.is_compiling() and is_functorch_wrapped_tensor(t):
        t = get_unwrapped(t)
    return t


def check_index_values(name: str, t, limit: int):
    """Lengths must lie in [0, limit]: checked where values_free(t); elsewhere the kernels clamp
    (see the module docstring)."""
    if t is None or t.numel() == 0 or not values_free(t):
        return
    t = every_sample(t)
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi > limit:
        fail(f"{name} must be in [0, {limit}], got values in [{lo}, {hi}]")


# --- the raw operators' arguments, as the routers and fakes receive them (rows already flattened):
# the same checks the C++ kernels make (csrc/checks.h), so that a direct call of a torch.ops
# operator raises on every backend, fake ones included, instead of reading out of bounds.


def check_rows(name: str, t, ref_name: str = None, ref=None, rows: int = None):
    """A 2-D (rows, width) float tensor with a contiguous last dim; like ref if given."""
    check_float(name, t)
    if ref is not None:
        check_like(name, t, ref_name, ref)
    if t.dim() != 2 or (rows is not None and t.shape[0] != rows):
        fail(f"{name} must be 2-D (rows{'' if rows is None else f' = {rows}'}, width), got shape {tuple(t.shape)}")
    check_last_dim_contiguous(name, t)


def check_row_list(name: str, tensors):
    if not isinstance(tensors, (list, tuple)) or len(tensors) == 0:
        fail(f"{name} must be a non-empty list of tensors, got {len(tensors) if isinstance(tensors, (list, tuple)) else type(tensors).__name__}")
    check_rows(f"{name}[0]", tensors[0])
    for i, t in enumerate(tensors[1:], 1):
        check_rows(f"{name}[{i}]", t, f"{name}[0]", tensors[0], tensors[0].shape[0])


def check_shape(name: str, t, shape: tuple, ref_name: str, ref, dtype=None):
    """Exactly `shape`, on ref's device, with ref's dtype (or `dtype`, or any float if dtype is False)."""
    if not isinstance(t, torch.Tensor):
        fail(f"{name} must be a tensor of shape {shape}, got {type(t).__name__}")
    want = ref.dtype if dtype is None else dtype
    if tuple(t.shape) != tuple(shape) or t.device != ref.device or (want is not False and t.dtype != want) \
            or (want is False and not t.is_floating_point()):
        fail(f"{name} must have shape {tuple(shape)}, {ref_name}'s device ({ref.device})"
             f"{'' if want is False else f' and dtype {want}'}, got {t.dtype} of shape {tuple(t.shape)} on {t.device}")


def check_same_device(ref_name: str, ref, **tensors):
    """Every given tensor on ref's device (a cpu op with a meta length would otherwise be
    dispatched to the fake kernel and return uninitialised memory)."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != ref.device:
            fail(f"{name} must be on {ref_name}'s device ({ref.device}), got {t.device}")


def as_rows(name: str, t):
    """t (..., D) as a (rows, D) view: the shape the fusion operators take. Never a copy: a layout
    that does not flatten raises, saying so."""
    check_last_dim_contiguous(name, t)
    try:
        return t.view(math.prod(t.shape[:-1]), t.shape[-1])  # (not -1: a width of 0 leaves the rows undetermined)
    except RuntimeError:
        fail(f"{name} must be viewable as (rows, {t.shape[-1]}) without a copy, got shape "
             f"{tuple(t.shape)} with strides {tuple(t.stride())}; call .contiguous() on it first")
