"""linear_fusion on every backend that runs here, against float64 composites."""
import pytest
import torch
import torch.nn.functional as F

import mmkernels
from tolerance import check_against_composite as check


ACTS = {None: lambda x: x, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def linear_composite(features, weights, bias, activation):
    return ACTS[activation](F.linear(torch.cat(features, -1), torch.cat(weights, 1), bias))


LINEAR_CASES = [((4, 12), (9,), 5), ((16,), (3, 2), 8), ((3,) * 8, (5,), 6), ((7, 13), (0,), 3)]


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("widths,lead,N", LINEAR_CASES, ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_linear_fusion(backend, widths, lead, N, activation):
    M = len(widths)
    tensors = [torch.randn(*lead, d) for d in widths] + [torch.randn(N, d) / d**0.5 for d in widths] + [torch.randn(N)]
    check(lambda t: mmkernels.linear_fusion(t[:M], t[M : 2 * M], t[-1], activation=activation, backend=backend),
          lambda t: linear_composite(t[:M], t[M : 2 * M], t[-1], activation), tensors, torch.float32)


def test_linear_fusion_without_bias_and_fp16():
    features, weights = [torch.randn(5, 6), torch.randn(5, 10)], [torch.randn(4, 6), torch.randn(4, 10)]
    torch.testing.assert_close(mmkernels.linear_fusion(features, weights), linear_composite(features, weights, None, None))
    check(lambda t: mmkernels.linear_fusion(t[:2], t[2:4], t[4], activation="gelu"),
          lambda t: linear_composite(t[:2], t[2:4], t[4], "gelu"), [*features, *weights, torch.randn(4)], torch.float16)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck(backend):
    f = [torch.randn(3, d, dtype=torch.float64, requires_grad=True) for d in (2, 3)]
    W = [torch.randn(4, d, dtype=torch.float64, requires_grad=True) for d in (2, 3)]
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f0, f1, w0, w1, b: mmkernels.linear_fusion([f0, f1], [w0, w1], b, activation="silu", backend=backend), (*f, *W, b))


@pytest.mark.parametrize("activation", [0, 2])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck_linear_fusion(backend, activation):
    f = [torch.randn(4, d, requires_grad=True) for d in (3, 5)]
    W = [torch.randn(6, d, requires_grad=True) for d in (3, 5)]
    torch.library.opcheck(torch.ops.mmkernels.linear_fusion.default, [f, W, torch.randn(6, requires_grad=True), activation, backend])


def test_compile_fullgraph():
    f = [torch.randn(4, d, requires_grad=True) for d in (3, 5)]
    W = [torch.randn(6, d, requires_grad=True) for d in (3, 5)]

    def fn(f0, f1, w0, w1):
        h = mmkernels.linear_fusion([f0, f1], [w0, w1], activation="relu")
        return mmkernels.decision_fusion([h, 2 * h], torch.tensor([1.0, 3.0]))

    expected = fn(*f, *W)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*f, *W)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), [*f, *W]), torch.autograd.grad(expected.sum(), [*f, *W]))


@pytest.mark.parametrize("call,message", [
    (lambda: mmkernels.linear_fusion([torch.randn(2, 3)], [torch.randn(4, 3)] * 2), "weights must have one tensor per feature (1), got 2"),
    (lambda: mmkernels.linear_fusion([torch.randn(2, 3), torch.randn(2, 5)], [torch.randn(4, 3), torch.randn(4, 6)]), "weights[1] must have shape (N, D_1) = (4, 5), got (4, 6)"),
    (lambda: mmkernels.linear_fusion([torch.randn(2, 3)], [torch.randn(4, 3)], activation="elu"), "activation must be one of"),
    (lambda: mmkernels.linear_fusion([torch.randn(2, 3)] * 9, [torch.randn(4, 3)] * 9, backend="triton"), "supports at most 8 modalities, got 9"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_errors(call, message):
    with pytest.raises((ValueError, mmkernels.BackendUnavailable), match=__import__("re").escape(message)):
        call()


def test_linear_fusion_layer_loads_a_stock_linear():
    stock = torch.nn.Linear(12 + 20, 8)
    layer = mmkernels.nn.LinearFusion.from_module(stock, [12, 20], activation="tanh")
    assert set(layer.state_dict()) == {"weight", "bias"}
    a, b = torch.randn(5, 12), torch.randn(5, 20)
    torch.testing.assert_close(layer([a, b]), torch.tanh(stock(torch.cat([a, b], -1))))
    with pytest.raises(ValueError, match="LinearFusion: features must be 2 tensors of widths"):
        layer([a])
