"""gated_fusion: the gated multimodal unit over two modalities."""
import torch
from torch import Tensor

from mmkernels.backends.base import Problem
from mmkernels.ops.checks import (
    as_rows,
    check_bias,
    check_float,
    check_last_dim_contiguous,
    check_like,
    check_rows,
    check_shape,
    fail,
)
from mmkernels.ops.registration import autocasts, register_op
from mmkernels.spec import OpSpec, composite_fusion_backends


@autocasts()
def gated_fusion(x_a: Tensor, x_b: Tensor, weight_a: Tensor, weight_b: Tensor, weight_z: Tensor, bias_a: Tensor | None = None,
                 bias_b: Tensor | None = None, bias_z: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """h = z * tanh(x_a W_a^T + b_a) + (1 - z) * tanh(x_b W_b^T + b_b), z = sigmoid([x_a; x_b] W_z^T + b_z).

    x_a (..., Da), x_b (..., Db) with the same leading dims; weight_a (N, Da), weight_b (N, Db),
    weight_z (N, Da + Db); biases (N,). The concatenation [x_a; x_b] is never built.
    Returns (..., N)."""
    check_float("x_a", x_a)
    check_like("x_b", x_b, "x_a", x_a)
    if x_a.shape[:-1] != x_b.shape[:-1]:
        fail(f"x_b must have the leading dims {tuple(x_a.shape[:-1])} of x_a, got shape {tuple(x_b.shape)}")
    Da, Db = x_a.shape[-1], x_b.shape[-1]
    N = weight_a.shape[0] if isinstance(weight_a, torch.Tensor) and weight_a.dim() == 2 else -1
    for name, w, cols in (("weight_a", weight_a, Da), ("weight_b", weight_b, Db), ("weight_z", weight_z, Da + Db)):
        check_like(name, w, "x_a", x_a)
        if tuple(w.shape) != (N, cols):
            fail(f"{name} must have shape ({N}, {cols}), got {tuple(w.shape)}")
    for name, b in (("bias_a", bias_a), ("bias_b", bias_b), ("bias_z", bias_z)):
        check_bias(name, b, N, "x_a", x_a)
    lead = tuple(x_a.shape[:-1])
    out, *_ = _op(as_rows("x_a", x_a), as_rows("x_b", x_b), weight_a, weight_b, weight_z, bias_a, bias_b, bias_z, backend=backend)
    return out.view(*lead, N)


def check_operator(x_a, x_b, weight_a, weight_b, weight_z, bias_a, bias_b, bias_z):
    """The operator's arguments: (rows, Da), (rows, Db), their (N, .) weights and (N,) biases."""
    check_rows("x_a", x_a)
    check_rows("x_b", x_b, "x_a", x_a, x_a.shape[0])
    N = weight_a.shape[0] if isinstance(weight_a, torch.Tensor) and weight_a.dim() == 2 else -1
    Da, Db = x_a.shape[1], x_b.shape[1]
    for name, w, cols in (("weight_a", weight_a, Da), ("weight_b", weight_b, Db), ("weight_z", weight_z, Da + Db)):
        check_shape(name, w, (N, cols), "x_a", x_a)
    for name, b in (("bias_a", bias_a), ("bias_b", bias_b), ("bias_z", bias_z)):
        check_bias(name, b, N, "x_a", x_a)


def check_backward_operator(grad_out, x_a, x_b, weight_a, weight_b, weight_z, h_a, h_b, z):
    check_operator(x_a, x_b, weight_a, weight_b, weight_z, None, None, None)
    shape = (x_a.shape[0], weight_a.shape[0])
    for name, t in (("grad_out", grad_out), ("h_a", h_a), ("h_b", h_b), ("z", z)):
        check_shape(name, t, shape, "x_a", x_a)
    check_last_dim_contiguous("grad_out", grad_out)


def _problem(x_a, *rest):
    return Problem.of("gated_fusion", x_a, modalities=2)


def _fake_forward(x_a, x_b, weight_a, *rest):
    shape = (x_a.shape[0], weight_a.shape[0])
    return tuple(x_a.new_empty(shape) for _ in range(4))


def _fake_backward(grad_out, x_a, x_b, weight_a, weight_b, weight_z, *rest):
    n = weight_a.shape[0]
    return (x_a.new_empty(x_a.shape), x_b.new_empty(x_b.shape), weight_a.new_empty(weight_a.shape), weight_b.new_empty(weight_b.shape),
            weight_z.new_empty(weight_z.shape), x_a.new_empty(n), x_a.new_empty(n), x_a.new_empty(n))


def _setup_context(ctx, inputs, output):
    x_a, x_b, weight_a, weight_b, weight_z, bias_a, bias_b, bias_z, backend = inputs
    ctx.save_for_backward(x_a, x_b, weight_a, weight_b, weight_z, *output[1:])
    ctx.has_bias = (bias_a is not None, bias_b is not None, bias_z is not None)


def _autograd_backward(ctx, grad_out, *unused):
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grads = ctx.backward_op(grad_out, *ctx.saved_tensors, ctx.backend)
    biases = [g if has else None for g, has in zip(grads[5:], ctx.has_bias)]
    return (*grads[:5], *biases, None)


def _example():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_()
    return [r(6, 3), r(6, 5), r(4, 3), r(4, 5), r(4, 8), r(4), None, r(4)]


_op = register_op(OpSpec(
    name="gated_fusion", function=gated_fusion, layer="GatedMultimodalUnit", problem=_problem, check=check_operator,
    check_backward=check_backward_operator, fake=_fake_forward, backward_fake=_fake_backward, setup_context=_setup_context,
    backward=_autograd_backward, example=_example, shared=("weight_a", "weight_b", "weight_z", "bias_a", "bias_b", "bias_z"),
    backends=composite_fusion_backends(),
))
