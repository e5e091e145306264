"""concat_weighted_fusion: the public function, the operator's router, its fake and its autograd."""
from collections.abc import Sequence

import torch
from torch import Tensor

from mmkernels.backends.base import Problem, acc_dtype
from mmkernels.limits import MAX_MODALITIES
from mmkernels.ops.checks import (
    as_rows,
    check_bias,
    check_last_dim_contiguous,
    check_like,
    check_row_list,
    check_rows,
    check_shape,
    check_tensor_list,
    fail,
)
from mmkernels.ops.registration import autocasts, register_op
from mmkernels.spec import HALVES_AND_FLOAT32, Capability, OpSpec

OUTPUTS = ("sum", "concat")


@autocasts()
def concat_weighted_fusion(features: Sequence[Tensor], weight: Tensor, bias: Tensor | None = None, *,
                           values: Sequence[Tensor] | None = None, output: str = "sum", backend: str | None = None) -> Tensor:
    """Softmax-weighted fusion of M modalities.

    features: M tensors (..., D_m) with the same leading dims; weight: (M, sum D_m); bias: (M,).
    w = softmax_m(concat(features) @ weight.T + bias) is computed without building the
    concatenation. values: M tensors (..., E_m) to weight (default: the features).
    output="sum": sum_m w_m * values[m] (all E_m equal) -> (..., E);
    output="concat": concat_m(w_m * values[m]) -> (..., sum E_m).

    Each input must be viewable as (rows, D) without a copy (leading dims that flatten, last
    dim contiguous); a layout that can't raises instead of being copied behind your back.
    """
    lead = check_tensor_list("features", features)
    M = len(features)
    widths = [f.shape[-1] for f in features]
    check_like("weight", weight, "features[0]", features[0])
    if tuple(weight.shape) != (M, sum(widths)):
        fail(f"weight must have shape (M, sum D_m) = ({M}, {sum(widths)}), got {tuple(weight.shape)}")
    check_bias("bias", bias, M, "features[0]", features[0])
    if output not in OUTPUTS:
        fail(f"output must be 'sum' or 'concat', got {output!r}")
    if values is not None:
        if not isinstance(values, (list, tuple)) or len(values) != M:
            fail(f"values must be a list of {M} tensors (one per feature), got {len(values) if isinstance(values, (list, tuple)) else type(values).__name__}")
        for i, v in enumerate(values):
            check_like(f"values[{i}]", v, "features[0]", features[0])
            if tuple(v.shape[:-1]) != lead:
                fail(f"values[{i}] must have the leading dims {lead} of the features, got shape {tuple(v.shape)}")
    value_widths = [v.shape[-1] for v in (values or features)]
    if output == "sum" and any(w != value_widths[0] for w in value_widths):
        fail(f"output='sum' needs every {'values' if values else 'features'}[m] to have the same width, got {value_widths}; use output='concat'")

    rows = [as_rows(f"features[{i}]", f) for i, f in enumerate(features)]
    value_rows = [as_rows(f"values[{i}]", v) for i, v in enumerate(values)] if values is not None else []
    out, _ = _op(rows, weight, bias, value_rows, output == "concat", backend=backend)
    return out.view(*lead, out.shape[-1])


def check_operator(features, weight, bias, values, concat):
    """The operator's arguments: (rows, D_m) features, weight (M, sum D_m), bias (M,), values."""
    check_row_list("features", features)
    M, rows = len(features), features[0].shape[0]
    check_shape("weight", weight, (M, sum(f.shape[1] for f in features)), "features[0]", features[0])
    check_bias("bias", bias, M, "features[0]", features[0])
    if values and len(values) != M:
        fail(f"values must be empty or hold one tensor per feature ({M}), got {len(values)}")
    for i, v in enumerate(values or []):
        check_rows(f"values[{i}]", v, "features[0]", features[0], rows)
    widths = [v.shape[1] for v in (values or features)]
    if not concat and any(w != widths[0] for w in widths):
        fail(f"output='sum' needs every value of the same width, got {widths}")


def check_backward_operator(grad_out, features, weight, values, gate, concat):
    check_operator(features, weight, None, values, concat)
    widths = [v.shape[1] for v in (values or features)]
    check_shape("grad_out", grad_out, (features[0].shape[0], sum(widths) if concat else widths[0]), "features[0]", features[0])
    check_last_dim_contiguous("grad_out", grad_out)
    check_shape("gate", gate, (features[0].shape[0], len(features)), "features[0]", features[0], dtype=False)


def _problem(features, *rest):
    return Problem.of("concat_weighted_fusion", features[0], modalities=len(features))


def _fake_forward(features, weight, bias, values, concat, *rest):
    vals = values or features
    width = sum(v.shape[1] for v in vals) if concat else vals[0].shape[1]
    rows = features[0].shape[0]
    return features[0].new_empty(rows, width), features[0].new_empty(rows, len(features), dtype=acc_dtype(features[0].dtype))


def _fake_backward(grad_out, features, weight, values, gate, concat, *rest):
    return (
        [f.new_empty(f.shape) for f in features],
        weight.new_empty(weight.shape),
        weight.new_empty(weight.shape[0]),
        [v.new_empty(v.shape) for v in values],
    )


def _setup_context(ctx, inputs, output):
    features, weight, bias, values, concat, backend = inputs
    ctx.save_for_backward(weight, output[1], *features, *values)
    ctx.m, ctx.has_bias, ctx.concat = len(features), bias is not None, concat


def _autograd_backward(ctx, grad_out, grad_gate):
    weight, gate, *rest = ctx.saved_tensors
    features, values = rest[: ctx.m], rest[ctx.m :]
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grad_features, grad_weight, grad_bias, grad_values = ctx.backward_op(
        grad_out, features, weight, values, gate, ctx.concat, ctx.backend
    )
    return grad_features, grad_weight, grad_bias if ctx.has_bias else None, grad_values, None, None


def _example():
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(6, d, generator=g).requires_grad_() for d in (3, 5)]
    return [features, torch.randn(2, 8, generator=g).requires_grad_(), torch.randn(2, generator=g).requires_grad_(), [], True]


_op = register_op(OpSpec(
    name="concat_weighted_fusion", function=concat_weighted_fusion, layer="ConcatWeightedFusion", problem=_problem, check=check_operator,
    check_backward=check_backward_operator, fake=_fake_forward, backward_fake=_fake_backward, setup_context=_setup_context,
    backward=_autograd_backward, example=_example, shared=("weight", "bias"),
    backends={
        "reference": Capability(),
        "cpu": Capability(),
        "cuda": Capability(dtypes=HALVES_AND_FLOAT32, max_modalities=MAX_MODALITIES,
                           note="float64 is left to the reference backend: the kernel accumulates in fp32"),
        "triton": Capability(dtypes=HALVES_AND_FLOAT32, max_modalities=MAX_MODALITIES),
    },
))
