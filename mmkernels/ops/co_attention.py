"""co_attention: both directions of cross-attention between two modalities (LXMERT, co-attention VQA)."""
import torch
from torch import Tensor

from mmkernels.backends.base import Problem, stats_shape
from mmkernels.ops.checks import check_index_values, check_last_dim_contiguous, check_shape, fail
from mmkernels.ops.cross_attention import ATTENTION_BACKENDS, apply_scale, check_attention_inputs
from mmkernels.ops.registration import autocasts, register_op
from mmkernels.spec import OpSpec


@autocasts()
def co_attention(q_a: Tensor, k_a: Tensor, v_a: Tensor, q_b: Tensor, k_b: Tensor, v_b: Tensor, *,
                 lengths_a: Tensor | None = None, lengths_b: Tensor | None = None, kv_start_a: Tensor | None = None,
                 kv_end_a: Tensor | None = None, kv_start_b: Tensor | None = None, kv_end_b: Tensor | None = None,
                 scale: float | None = None, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """(out_a, out_b) with out_a = cross_attention(q_a, k_b, v_b, kv_lengths=lengths_b,
    q_lengths=lengths_a, kv_start=kv_start_a, kv_end=kv_end_a) and out_b = cross_attention(q_b,
    k_a, v_a, kv_lengths=lengths_a, q_lengths=lengths_b, kv_start=kv_start_b, kv_end=kv_end_b):
    modality a's tokens (B, H, La, D), b's (B, H', Lb, D), each side with its own lengths and
    per-row key ranges (kv_start_a/kv_end_a: (B, La), which of b's tokens each of a's rows sees;
    kv_start_b/kv_end_b: (B, Lb)). The triton backend computes both directions in one launch
    per stage; the numbers are those of two cross_attention calls."""
    check_operator(q_a, k_a, v_a, q_b, k_b, v_b, lengths_a, lengths_b, kv_start_a, kv_end_a, kv_start_b, kv_end_b, 1.0)
    if isinstance(scale, torch.Tensor):
        fail("scale must be a number for co_attention (a tensor scale is taken by cross_attention)")
    _, scale = apply_scale(q_a, scale)
    out_a, _, out_b, _ = _op(q_a, k_a, v_a, q_b, k_b, v_b, lengths_a, lengths_b, kv_start_a, kv_end_a, kv_start_b, kv_end_b, scale,
                             backend=backend)
    return out_a, out_b


def _problem(q_a, k_a, v_a, q_b, k_b, v_b, *rest):
    return Problem.of("co_attention", q_a, k_a, v_a, q_b, k_b, v_b, head_dim=q_a.shape[-1])


def check_operator(q_a, k_a, v_a, q_b, k_b, v_b, lengths_a, lengths_b, kv_start_a, kv_end_a, kv_start_b, kv_end_b, scale):
    check_attention_inputs(q_a, k_b, v_b, lengths_b, None, lengths_a, kv_start_a, kv_end_a,
                           names=("q_a", "k_b", "v_b", "lengths_b", "", "lengths_a", "kv_start_a", "kv_end_a"))
    check_attention_inputs(q_b, k_a, v_a, lengths_a, None, lengths_b, kv_start_b, kv_end_b,
                           names=("q_b", "k_a", "v_a", "lengths_a", "", "lengths_b", "kv_start_b", "kv_end_b"))
    if q_a.shape[-1] != q_b.shape[-1]:
        fail(f"q_b must have q_a's head dim {q_a.shape[-1]}, got {q_b.shape[-1]}")
    if k_a.shape[2] != q_a.shape[2] or k_b.shape[2] != q_b.shape[2]:
        fail(f"each modality's q, k and v must have its length: got La = {q_a.shape[2]} (q_a) and {k_a.shape[2]} (k_a), "
             f"Lb = {q_b.shape[2]} (q_b) and {k_b.shape[2]} (k_b)")
    check_index_values("lengths_a", lengths_a, q_a.shape[2])
    check_index_values("lengths_b", lengths_b, q_b.shape[2])


def check_backward_operator(grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b, out_a, lse_a, out_b, lse_b, *rest):
    check_operator(q_a, k_a, v_a, q_b, k_b, v_b, *rest)
    for name, t, q in (("grad_a", grad_a, q_a), ("out_a", out_a, q_a), ("grad_b", grad_b, q_b), ("out_b", out_b, q_b)):
        check_shape(name, t, tuple(q.shape), "q" + name[-2:], q)
        check_last_dim_contiguous(name, t)
    for name, lse, q in (("lse_a", lse_a, q_a), ("lse_b", lse_b, q_b)):
        shape, dtype = stats_shape(q.dtype, tuple(q.shape[:3]))
        check_shape(name, lse, shape, "q" + name[-2:], q, dtype=dtype)


def _fake_forward(q_a, k_a, v_a, q_b, *rest):
    lse = lambda q: q.new_empty(stats_shape(q.dtype, q.shape[:3])[0], dtype=stats_shape(q.dtype, ())[1])
    return torch.empty_like(q_a), lse(q_a), torch.empty_like(q_b), lse(q_b)


def _fake_backward(grad_a, grad_b, *tensors_and_rest):
    return tuple(torch.empty_like(t) for t in tensors_and_rest[:6])


def _setup_context(ctx, inputs, output):
    *tensors, lengths_a, lengths_b, kv_start_a, kv_end_a, kv_start_b, kv_end_b, scale, backend = inputs
    ctx.save_for_backward(*tensors, *output, lengths_a, lengths_b, kv_start_a, kv_end_a, kv_start_b, kv_end_b)
    ctx.scale = scale


def _autograd_backward(ctx, grad_a, grad_lse_a, grad_b, grad_lse_b):
    saved = ctx.saved_tensors
    grad_a = torch.zeros_like(saved[6]) if grad_a is None else grad_a.contiguous() if grad_a.stride(-1) != 1 else grad_a
    grad_b = torch.zeros_like(saved[8]) if grad_b is None else grad_b.contiguous() if grad_b.stride(-1) != 1 else grad_b
    grads = ctx.backward_op(grad_a, grad_b, *saved, ctx.scale, ctx.backend)
    return (*grads, *(None,) * 8)


def _example():
    g = torch.Generator().manual_seed(0)
    q_a, k_a, v_a = (torch.randn(2, 2, 5, 8, generator=g).requires_grad_() for _ in range(3))
    q_b, k_b, v_b = (torch.randn(2, 2, 7, 8, generator=g).requires_grad_() for _ in range(3))
    return [q_a, k_a, v_a, q_b, k_b, v_b, torch.tensor([5, 2]), torch.tensor([7, 3]), None, None, None, None, 0.25]


_op = register_op(OpSpec(
    name="co_attention", function=co_attention, layer="CoAttention", problem=_problem, check=check_operator,
    check_backward=check_backward_operator, fake=_fake_forward, backward_fake=_fake_backward, setup_context=_setup_context,
    backward=_autograd_backward, example=_example, grads=2,
    heads=("q_a", "k_a", "v_a", "q_b", "k_b", "v_b", "out_a", "lse_a", "out_b", "lse_b", "grad_a", "grad_b"),
    backends=ATTENTION_BACKENDS,
))
