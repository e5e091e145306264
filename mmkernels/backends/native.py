"""The C++ backends: `cpu` and `cuda` call the same mmkernels::native_* operators, and the
dispatcher picks the CPU or CUDA kernel by the tensors' device."""
import functools

import torch

from mmkernels import _C
from mmkernels.backends.base import Problem, co_attention_backward_by_two_calls, co_attention_by_two_calls, gpu_index

_native = torch.ops.mmkernels  # called by overload (.default): a packet resolves it on every call

CUDA_COMPILED = "cuda" in _C.compiled_backends
# The tensor-core attention kernels (csrc/cuda/cross_attention) are compiled in CI and their logic
# runs there on the CPU (csrc/test/test_attention_emulated.cpp), but they have not yet run on a
# GPU: the PTX itself, asynchronous copies and speed are unproven. Until the GPU suite
# (tests/test_cuda_backend.py) has passed on one, their capability says auto=False: auto leaves
# attention on CUDA to the triton backend and only an explicit backend="cuda" runs them.
CUDA_ATTENTION_VERIFIED = False


def cpu_rules(p: Problem, explicit: bool) -> list[str]:
    return [] if p.device.type == "cpu" else [f"runs on cpu tensors, got {p.device.type}"]


BUILT_ARCHS = tuple(int(a) for a in _C.cuda_archs.split(",") if a)  # cubins for these; PTX for the newest


def runs_on(capability: tuple[int, int], archs=BUILT_ARCHS) -> str | None:
    """None if a GPU of this compute capability can run the CUDA kernels, else why not: it needs
    sm_80 or newer, and either a cubin of its major version no newer than it (sm_80 runs on an
    sm_86) or the PTX of the newest built arch, which the driver compiles for newer GPUs."""
    cc = 10 * capability[0] + capability[1]
    if cc < 80:
        return f"the CUDA kernels need sm_80 or newer, got sm_{cc}"
    if any(a // 10 == capability[0] and a <= cc for a in archs) or (archs and cc >= max(archs)):
        return None
    return f"this build has code for sm_{', sm_'.join(map(str, archs))} (MMKERNELS_CUDA_ARCHS), none of it runs on sm_{cc}"


@functools.lru_cache(maxsize=None)
def _device_reason(index: int | None) -> str | None:
    return None if index is None else runs_on(torch.cuda.get_device_capability(index))


def cuda_rules(p: Problem, explicit: bool) -> list[str]:
    if not CUDA_COMPILED:
        return ["this build of mmkernels has no CUDA kernels (built without nvcc or a CUDA torch)"]
    if p.device.type != "cuda":
        return [f"runs on cuda tensors, got {p.device.type}"]
    why = _device_reason(gpu_index(p.device))
    return [why] if why else []


@functools.lru_cache(maxsize=None)
def _shared_optin(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def attention_fits(p: Problem) -> str | None:
    """The tensor-core attention kernels' shared memory (mmkernels/limits.py CUDA_ATTENTION_TILES)
    within what one block may use on this GPU: sm_86 and sm_89 allow less than sm_80 and sm_90."""
    from mmkernels.limits import CUDA_ATTENTION_TILES

    if p.device.type != "cuda" or p.head_dim not in CUDA_ATTENTION_TILES["fwd"] or (index := gpu_index(p.device)) is None:
        return None
    needed = max(CUDA_ATTENTION_TILES[k][p.head_dim]["shared_bytes"] for k in CUDA_ATTENTION_TILES)
    allowed = _shared_optin(index)
    if needed > allowed:
        return f"its kernels at head dim {p.head_dim} need {needed} B of shared memory per block, this GPU allows {allowed}"
    return None


def cross_attention(q, k, v, *visibility):
    return _native.native_cross_attention.default(q, k, v, *visibility)


def cross_attention_backward(grad_out, q, k, v, out, lse, *visibility):
    return _native.native_cross_attention_backward.default(grad_out, q, k, v, out, lse, *visibility)


def concat_weighted_fusion(features, weight, bias, values, concat):
    return _native.native_concat_weighted_fusion.default(features, weight, bias, values, concat)


def concat_weighted_fusion_backward(grad_out, features, weight, values, gate, concat):
    return _native.native_concat_weighted_fusion_backward.default(grad_out, features, weight, values, gate, concat)


def decision_fusion(logits, weights, prob):
    return _native.native_decision_fusion.default(logits, weights, prob)


def decision_fusion_backward(grad_out, logits, weights, prob):
    return _native.native_decision_fusion_backward.default(grad_out, logits, weights, prob)


def linear_fusion(features, weights, bias, activation):
    return _native.native_linear_fusion.default(features, weights, bias, activation)


def linear_fusion_backward(grad_out, features, weights, pre, activation):
    return _native.native_linear_fusion_backward.default(grad_out, features, weights, pre, activation)


def gated_fusion(x_a, x_b, weight_a, weight_b, weight_z, bias_a, bias_b, bias_z):
    return _native.native_gated_fusion.default(x_a, x_b, weight_a, weight_b, weight_z, bias_a, bias_b, bias_z)


def gated_fusion_backward(grad_out, x_a, x_b, weight_a, weight_b, weight_z, h_a, h_b, z):
    return _native.native_gated_fusion_backward.default(grad_out, x_a, x_b, weight_a, weight_b, weight_z, h_a, h_b, z)


# Two launches of the native kernel: on the CPU a single launch saves nothing, and the CUDA
# kernel has no fused two-direction form yet.
co_attention = functools.partial(co_attention_by_two_calls, cross_attention)
co_attention_backward = functools.partial(co_attention_backward_by_two_calls, cross_attention_backward)


def gated_residual_linear(x, h, weight, bias, gate, row_mask):
    return _native.native_gated_residual_linear.default(x, h, weight, bias, gate, row_mask)


def gated_residual_linear_backward(grad_out, h, weight, gate, row_mask, proj):
    return _native.native_gated_residual_linear_backward.default(grad_out, h, weight, gate, row_mask, proj)
