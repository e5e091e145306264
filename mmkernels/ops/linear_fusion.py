"""linear_fusion: one linear layer over the (virtual) concatenation of the modalities."""
import torch

from mmkernels.backends.base import Problem
from mmkernels.limits import ACTIVATIONS, MAX_MODALITIES
from mmkernels.ops.checks import (
    as_rows,
    check_bias,
    check_last_dim_contiguous,
    check_like,
    check_row_list,
    check_shape,
    check_tensor_list,
    fail,
)
from mmkernels.ops.registration import autocasts, register_op
from mmkernels.spec import OpSpec, composite_fusion_backends


@autocasts()
def linear_fusion(features, weights, bias=None, *, activation=None, backend=None):
    """act(sum_m features[m] @ weights[m].T + bias) without building concat(features).

    features: M tensors (..., D_m) with the same leading dims; weights: M tensors (N, D_m);
    bias: (N,); activation: None, "relu", "gelu", "silu", "tanh" or "sigmoid". Equal to
    act(F.linear(torch.cat(features, -1), torch.cat(weights, 1), bias)). Returns (..., N).
    """
    lead = check_tensor_list("features", features)
    if not isinstance(weights, (list, tuple)) or len(weights) != len(features):
        fail(f"weights must have one tensor per feature ({len(features)}), got {len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__}")
    N = weights[0].shape[0] if isinstance(weights[0], torch.Tensor) and weights[0].dim() == 2 else -1
    for i, (f, w) in enumerate(zip(features, weights)):
        check_like(f"weights[{i}]", w, "features[0]", features[0])
        if tuple(w.shape) != (N, f.shape[-1]):
            fail(f"weights[{i}] must have shape (N, D_{i}) = ({N}, {f.shape[-1]}), got {tuple(w.shape)}")
    check_bias("bias", bias, N, "features[0]", features[0])
    if activation not in ACTIVATIONS:
        fail(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    rows = [as_rows(f"features[{i}]", f) for i, f in enumerate(features)]
    out, _ = _op(rows, list(weights), bias, ACTIVATIONS.index(activation), backend=backend)
    return out.view(*lead, N)


def check_operator(features, weights, bias, activation):
    """The operator's arguments: M (rows, D_m) features, M (N, D_m) weights, bias (N,), an
    index into ACTIVATIONS."""
    check_row_list("features", features)
    if not isinstance(weights, (list, tuple)) or len(weights) != len(features):
        fail(f"weights must hold one tensor per feature ({len(features)}), got {len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__}")
    N = weights[0].shape[0] if isinstance(weights[0], torch.Tensor) and weights[0].dim() == 2 else -1
    for i, (f, w) in enumerate(zip(features, weights)):
        check_shape(f"weights[{i}]", w, (N, f.shape[1]), "features[0]", features[0])
    check_bias("bias", bias, N, "features[0]", features[0])
    if not 0 <= activation < len(ACTIVATIONS):
        fail(f"activation must be an index in [0, {len(ACTIVATIONS)}), got {activation}")


def check_backward_operator(grad_out, features, weights, pre, activation):
    check_operator(features, weights, None, activation)
    shape = (features[0].shape[0], weights[0].shape[0])
    check_shape("grad_out", grad_out, shape, "features[0]", features[0])
    check_last_dim_contiguous("grad_out", grad_out)
    if activation != 0:
        check_shape("pre", pre, shape, "features[0]", features[0])


def _problem(features, *rest):
    return Problem.of("linear_fusion", features[0], modalities=len(features))


def _fake_forward(features, weights, bias, activation, *rest):
    rows, N = features[0].shape[0], weights[0].shape[0]
    pre = features[0].new_empty(0) if activation == 0 else features[0].new_empty(rows, N)
    return features[0].new_empty(rows, N), pre


def _fake_backward(grad_out, features, weights, pre, activation, *rest):
    return [f.new_empty(f.shape) for f in features], [w.new_empty(w.shape) for w in weights], weights[0].new_empty(weights[0].shape[0])


def _setup_context(ctx, inputs, output):
    features, weights, bias, activation, backend = inputs
    ctx.save_for_backward(output[1], *features, *weights)
    ctx.m, ctx.has_bias, ctx.activation = len(features), bias is not None, activation


def _autograd_backward(ctx, grad_out, grad_pre):
    pre, *rest = ctx.saved_tensors
    features, weights = rest[: ctx.m], rest[ctx.m :]
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grad_features, grad_weights, grad_bias = ctx.backward_op(
        grad_out, features, weights, pre, ctx.activation, ctx.backend
    )
    return grad_features, grad_weights, grad_bias if ctx.has_bias else None, None, None


def _example():
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(6, d, generator=g).requires_grad_() for d in (3, 5)]
    weights = [torch.randn(4, d, generator=g).requires_grad_() for d in (3, 5)]
    return [features, weights, torch.randn(4, generator=g).requires_grad_(), ACTIVATIONS.index("gelu")]


_op = register_op(OpSpec(
    name="linear_fusion", function=linear_fusion, layer="LinearFusion", problem=_problem, check=check_operator,
    check_backward=check_backward_operator, fake=_fake_forward, backward_fake=_fake_backward, setup_context=_setup_context,
    backward=_autograd_backward, example=_example, shared=("weights", "bias"),
    backends=composite_fusion_backends(MAX_MODALITIES),
))
