"""The C++ backends: `cpu` and `cuda` call the same mmkernels::native_* operators, and the
dispatcher picks the CPU or CUDA kernel by the tensors' device."""
import functools

import torch

from mmkernels import _C
from mmkernels.backends.base import Problem, co_attention_backward_by_two_calls, co_attention_by_two_calls

_native = torch.ops.mmkernels

CUDA_COMPILED = "cuda" in _C.compiled_backends
# The tensor-core attention kernels (csrc/cuda/cross_attention) are compiled in CI and their logic
# runs there on the CPU (csrc/test/test_attention_emulated.cpp), but they have not yet run on a
# GPU: the PTX itself, asynchronous copies and speed are unproven. Until the GPU suite
# (tests/test_cuda_backend.py) has passed on one, their capability says auto=False: auto leaves
# attention on CUDA to the triton backend and only an explicit backend="cuda" runs them.
CUDA_ATTENTION_VERIFIED = False


def cpu_rules(p: Problem, explicit: bool) -> list[str]:
    return [] if p.device.type == "cpu" else [f"runs on cpu tensors, got {p.device.type}"]


def cuda_rules(p: Problem, explicit: bool) -> list[str]:
    if not CUDA_COMPILED:
        return ["this build of mmkernels has no CUDA kernels (built without nvcc or a CUDA torch)"]
    return [] if p.device.type == "cuda" else [f"runs on cuda tensors, got {p.device.type}"]


def cross_attention(q, k, v, *visibility):
    return _native.native_cross_attention(q, k, v, *visibility)


def cross_attention_backward(grad_out, q, k, v, out, lse, *visibility):
    return _native.native_cross_attention_backward(grad_out, q, k, v, out, lse, *visibility)


def concat_weighted_fusion(features, weight, bias, values, concat):
    return _native.native_concat_weighted_fusion(features, weight, bias, values, concat)


def concat_weighted_fusion_backward(grad_out, features, weight, values, gate, concat):
    return _native.native_concat_weighted_fusion_backward(grad_out, features, weight, values, gate, concat)


def decision_fusion(logits, weights, prob):
    return _native.native_decision_fusion(logits, weights, prob)


def decision_fusion_backward(grad_out, logits, weights, prob):
    return _native.native_decision_fusion_backward(grad_out, logits, weights, prob)


def linear_fusion(features, weights, bias, activation):
    return _native.native_linear_fusion(features, weights, bias, activation)


def linear_fusion_backward(grad_out, features, weights, pre, activation):
    return _native.native_linear_fusion_backward(grad_out, features, weights, pre, activation)


def gated_fusion(x_a, x_b, weight_a, weight_b, weight_z, bias_a, bias_b, bias_z):
    return _native.native_gated_fusion(x_a, x_b, weight_a, weight_b, weight_z, bias_a, bias_b, bias_z)


def gated_fusion_backward(grad_out, x_a, x_b, weight_a, weight_b, weight_z, h_a, h_b, z):
    return _native.native_gated_fusion_backward(grad_out, x_a, x_b, weight_a, weight_b, weight_z, h_a, h_b, z)


# Two launches of the native kernel: on the CPU a single launch saves nothing, and the CUDA
# kernel has no fused two-direction form yet.
co_attention = functools.partial(co_attention_by_two_calls, cross_attention)
co_attention_backward = functools.partial(co_attention_backward_by_two_calls, cross_attention_backward)


def gated_residual_linear(x, h, weight, bias, gate, row_mask):
    return _native.native_gated_residual_linear(x, h, weight, bias, gate, row_mask)


def gated_residual_linear_backward(grad_out, h, weight, gate, row_mask, proj):
    return _native.native_gated_residual_linear_backward(grad_out, h, weight, gate, row_mask, proj)
