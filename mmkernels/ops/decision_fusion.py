"""decision_fusion: late fusion of per-modality predictions."""
import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor

from mmkernels.backends.base import Problem, acc_dtype
from mmkernels.limits import MAX_MODALITIES
from mmkernels.ops.checks import (
    as_rows,
    every_sample,
    check_last_dim_contiguous,
    check_row_list,
    check_shape,
    check_tensor_list,
    fail,
    values_free,
)
from mmkernels.ops.registration import autocasts, register_op
from mmkernels.spec import HALVES_AND_FLOAT32, Capability, OpSpec

MODES = ("prob", "logit")


@autocasts(keep=("weights",))
def decision_fusion(logits: Sequence[Tensor], weights: Tensor | None = None, *, mode: str = "prob",
                    backend: str | None = None) -> Tensor:
    """Weighted mean of M per-modality predictions, each (..., C).

    weights (M,) >= 0 are normalised to sum 1 (uniform when None) and get a gradient.
    mode="prob": sum_m w_m softmax(logits_m) (fused, numerically stable, one pass);
    mode="logit": sum_m w_m logits_m. Returns (..., C) in the logits' dtype.
    """
    check_tensor_list("logits", logits)
    shape = tuple(logits[0].shape)
    for i, t in enumerate(logits):
        if tuple(t.shape) != shape:
            fail(f"logits[{i}] must have the shape {shape} of logits[0], got {tuple(t.shape)}")
    if mode not in MODES:
        fail(f"mode must be 'prob' or 'logit', got {mode!r}")
    M, acc = len(logits), acc_dtype(logits[0].dtype)
    if weights is None:
        w = torch.full((M,), 1.0 / M, dtype=acc, device=logits[0].device)
    else:
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point() or weights.device != logits[0].device:
            got = f"{weights.dtype} on {weights.device}" if isinstance(weights, torch.Tensor) else type(weights).__name__
            fail(f"weights must be a float tensor on the logits' device ({logits[0].device}), got {got}")
        if tuple(weights.shape) != (M,):
            fail(f"weights must have shape ({M},), one per modality, got {tuple(weights.shape)}")
        check_weights(weights)
        w = weights.to(acc) / weights.to(acc).sum()
    rows = [as_rows(f"logits[{i}]", t) for i, t in enumerate(logits)]
    out = _op(rows, w, mode == "prob", backend=backend)
    return out.view(shape)


def check_operator(logits, weights, prob):
    """The operator's arguments: M (rows, C) logits and M normalised weights."""
    check_row_list("logits", logits)
    for i, t in enumerate(logits):
        if t.shape != logits[0].shape:
            fail(f"logits[{i}] must have the shape {tuple(logits[0].shape)} of logits[0], got {tuple(t.shape)}")
    check_shape("weights", weights, (len(logits),), "logits[0]", logits[0], dtype=False)


def check_backward_operator(grad_out, logits, weights, prob):
    check_operator(logits, weights, prob)
    check_shape("grad_out", grad_out, tuple(logits[0].shape), "logits[0]", logits[0])
    check_last_dim_contiguous("grad_out", grad_out)


def check_weights(weights):
    """Finite, >= 0, a positive sum: read on the host where that is free (M numbers, cheaper in
    Python than the tensor ops on one row's call), else by a device-side assert (no sync)."""
    if values_free(weights) and not is_functorch_wrapped_tensor(weights):
        values = weights.tolist()
        if not (all(math.isfinite(x) and x >= 0 for x in values) and sum(values) > 0):
            fail(f"weights must be finite and >= 0 with a positive sum, got {values}")
        return
    plain = every_sample(weights)  # under vmap: every sample's weights
    valid = (plain >= 0).all() & torch.isfinite(plain).all() & every_sample(weights.sum() > 0).all()
    if not values_free(weights):  # a device-side assert (in the graph, while tracing): no host sync
        torch._assert_async(valid, "decision_fusion: weights must be finite and >= 0 with a positive sum")
    elif not bool(valid):
        fail(f"weights must be finite and >= 0 with a positive sum, got {plain.tolist()}")


def _problem(logits, *rest):
    return Problem.of("decision_fusion", logits[0], modalities=len(logits))


def _fake_forward(logits, weights, prob, *rest):
    return logits[0].new_empty(logits[0].shape)


def _fake_backward(grad_out, logits, weights, prob, *rest):
    return [t.new_empty(t.shape) for t in logits], weights.new_empty(weights.shape)


def _setup_context(ctx, inputs, output):
    logits, weights, prob, backend = inputs
    ctx.save_for_backward(weights, *logits)
    ctx.prob = prob


def _autograd_backward(ctx, grad_out):
    weights, *logits = ctx.saved_tensors
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grad_logits, grad_weights = ctx.backward_op(grad_out, logits, weights, ctx.prob, ctx.backend)
    return grad_logits, grad_weights, None, None


def _example():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(6, 4, generator=g).requires_grad_() for _ in range(3)]
    return [logits, torch.tensor([0.2, 0.3, 0.5], requires_grad=True), True]


_op = register_op(OpSpec(
    name="decision_fusion", function=decision_fusion, layer="DecisionFusion", problem=_problem, check=check_operator,
    check_backward=check_backward_operator, fake=_fake_forward, backward_fake=_fake_backward, setup_context=_setup_context,
    backward=_autograd_backward, example=_example, shared=("weights",),
    backends={
        "reference": Capability(),
        "cpu": Capability(),
        "triton": Capability(dtypes=HALVES_AND_FLOAT32, max_modalities=MAX_MODALITIES),
    },
))
