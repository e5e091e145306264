"""concat_weighted_fusion on every backend that runs here, against the float64 reference."""
import pytest
import torch

import mmkernels
from fusion_cases import FUSION_CASES, FusionCase, composite
from tolerance import assert_close

# "triton" runs here through TRITON_INTERPRET=1 (set in conftest.py).
BACKENDS = ["cpu", "reference", "triton"]


def grads_of(fn, features, weight, bias, values, grad):
    leaves = [t.detach().requires_grad_() for t in (*features, weight, *([bias] if bias is not None else []), *(values or []))]
    M = len(features)
    f, w = leaves[:M], leaves[M]
    b = leaves[M + 1] if bias is not None else None
    v = leaves[M + (2 if bias is not None else 1) :] or None
    out = fn(f, w, b, v)
    return out, torch.autograd.grad(out, leaves, grad)


def check_backend(backend, case, dtype, device="cpu"):
    features, weight, bias, values = case.make(dtype, device)
    kernel = lambda f, w, b, v: mmkernels.concat_weighted_fusion(f, w, b, values=v, output=case.output, backend=backend)
    plain = lambda f, w, b, v: composite(f, w, b, v, case.output)
    wide = lambda f, w, b, v: composite([x.double() for x in f], w.double(), None if b is None else b.double(), None if v is None else [x.double() for x in v], case.output)
    out_shape = composite(features, weight, bias, values, case.output).shape
    grad = torch.randn(out_shape, dtype=dtype, device=device)
    out, grads = grads_of(kernel, features, weight, bias, values, grad)
    comp, comp_grads = grads_of(plain, features, weight, bias, values, grad)
    ref, ref_grads = grads_of(wide, features, weight, bias, values, grad.double())
    assert out.dtype == dtype
    assert_close("out", out, comp, ref, dtype)
    for i, (g, c, r) in enumerate(zip(grads, comp_grads, ref_grads)):
        assert_close(f"grad[{i}]", g, c, r, dtype)


@pytest.mark.parametrize("case", FUSION_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_fp32(backend, case):
    check_backend(backend, case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [FusionCase(), FusionCase(values=(5, 7, 9), output="concat")], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_half_precision(backend, case, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 is broken in triton 3.8's interpreter; the triton backend's bf16 is tested on a GPU")
    check_backend(backend, case, dtype)


@pytest.mark.parametrize("backend", ["cpu", "reference"])  # triton has no float64
@pytest.mark.parametrize("case", [FusionCase(widths=(3, 3), lead=(4,)), FusionCase(widths=(3, 5), lead=(4,), values=(2, 6), output="concat")], ids=str)
def test_gradcheck_float64(backend, case):
    features, weight, bias, values = case.make(torch.float64)
    leaves = [t.requires_grad_() for t in (*features, weight, bias, *(values or []))]
    M = len(features)

    def fn(*xs):
        return mmkernels.concat_weighted_fusion(list(xs[:M]), xs[M], xs[M + 1], values=list(xs[M + 2 :]) or None, output=case.output, backend=backend)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend,rows", [("cpu", 20000), ("triton", 300)])
def test_weight_gradient_is_deterministic(backend, rows):
    features, weight, bias, _ = FusionCase(widths=(64, 64), lead=(rows,)).make(torch.float32)
    weight.requires_grad_()
    runs = [torch.autograd.grad(mmkernels.concat_weighted_fusion(features, weight, bias, backend=backend).sum(), weight)[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
