"""gated_residual_linear: the gated cross-attention output projection with its epilogue."""
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
def gated_residual_linear(x: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None = None, *, gate: Tensor,
                          row_mask: Tensor | None = None, backend: str | None = None) -> Tensor:
    """x + tanh(gate) * row_mask * (h @ weight.T + bias): Flamingo / IDEFICS / Llama 3.2 Vision's
    gated cross-attention residual, with the gate and the row mask fused into the projection's
    epilogue (on the triton backend). x (..., N), h (..., K), weight (N, K), bias (N,) or None,
    gate (1,) (required: the learned tanh gate, by keyword), row_mask (...) bool or float or None
    (every row): the rows that may see the other modality."""
    check_float("x", x)
    check_like("h", h, "x", x)
    check_like("weight", weight, "x", x)
    N, K = x.shape[-1], h.shape[-1]
    if x.shape[:-1] != h.shape[:-1]:
        fail(f"h must have the leading dims {tuple(x.shape[:-1])} of x, got shape {tuple(h.shape)}")
    if tuple(weight.shape) != (N, K):
        fail(f"weight must have shape (N, K) = ({N}, {K}), got {tuple(weight.shape)}")
    check_bias("bias", bias, N, "x", x)
    if not isinstance(gate, torch.Tensor) or tuple(gate.shape) != (1,) or gate.device != x.device:
        fail(f"gate must be a (1,) tensor on x's device ({x.device}), got {gate!r}")
    lead = tuple(x.shape[:-1])
    mask = None
    if row_mask is not None:
        if not isinstance(row_mask, torch.Tensor) or tuple(row_mask.shape) != lead or row_mask.device != x.device:
            fail(f"row_mask must have shape {lead} on x's device, got {tuple(row_mask.shape) if isinstance(row_mask, torch.Tensor) else row_mask!r}")
        mask = row_mask.reshape(-1).to(x.dtype)  # (rows,): tiny next to x; a float mask keeps its gradient
    out, _ = _op(as_rows("x", x), as_rows("h", h), weight, bias, gate.to(x.dtype), mask, backend=backend)
    return out.view(x.shape)


def check_operator(x, h, weight, bias, gate, row_mask):
    """The operator's arguments: x (rows, N), h (rows, K), weight (N, K), bias (N,), gate (1,), row_mask (rows,)."""
    check_rows("x", x)
    check_rows("h", h, "x", x, x.shape[0])
    check_shape("weight", weight, (x.shape[1], h.shape[1]), "x", x)
    check_bias("bias", bias, x.shape[1], "x", x)
    check_shape("gate", gate, (1,), "x", x)
    if row_mask is not None:
        check_shape("row_mask", row_mask, (x.shape[0],), "x", x)


def check_backward_operator(grad_out, h, weight, gate, row_mask, proj):
    check_operator(grad_out, h, weight, None, gate, row_mask)
    check_shape("proj", proj, tuple(grad_out.shape), "grad_out", grad_out)
    check_last_dim_contiguous("grad_out", grad_out)


def _problem(x, *rest):
    return Problem.of("gated_residual_linear", x)


def _fake_forward(x, h, weight, *rest):
    return torch.empty_like(x), x.new_empty(x.shape)


def _fake_backward(grad_out, h, weight, gate, row_mask, proj, *rest):
    return torch.empty_like(grad_out), torch.empty_like(h), torch.empty_like(weight), weight.new_empty(weight.shape[0]), torch.empty_like(gate)


def _setup_context(ctx, inputs, output):
    x, h, weight, bias, gate, row_mask, backend = inputs
    ctx.save_for_backward(h, weight, gate, row_mask, output[1])
    ctx.has_bias = bias is not None


def _autograd_backward(ctx, grad_out, grad_proj):
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    gx, gh, gw, gb, gg = ctx.backward_op(grad_out, *ctx.saved_tensors, ctx.backend)
    grad_mask = None
    if ctx.needs_input_grad[5]:  # a float row_mask that is learned: d out / d mask_r = tanh(gate) <dout_r, proj_r>
        _, _, gate, row_mask, proj = ctx.saved_tensors
        grad_mask = (torch.tanh(gate) * (grad_out * proj).sum(-1)).to(row_mask.dtype)
    return gx, gh, gw, gb if ctx.has_bias else None, gg, grad_mask, None


def _example():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_()
    return [r(6, 4), r(6, 3), r(4, 3), r(4), r(1), torch.tensor([1.0, 0, 1, 1, 0, 1])]


_op = register_op(OpSpec(
    name="gated_residual_linear", function=gated_residual_linear, layer="GatedCrossAttention", problem=_problem, check=check_operator,
    check_backward=check_backward_operator, fake=_fake_forward, backward_fake=_fake_backward, setup_context=_setup_context,
    backward=_autograd_backward, example=_example, shared=("weight", "bias", "gate"),
    backends=composite_fusion_backends(),
))
