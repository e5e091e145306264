"""decision_fusion and linear_fusion on every backend that runs here, against float64 composites."""
import pytest
import torch
import torch.nn.functional as F

import mmkernels
from tolerance import assert_close

ACTS = {None: lambda x: x, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def decision_composite(logits, weights, mode):
    w = torch.full((len(logits),), 1 / len(logits), dtype=logits[0].dtype) if weights is None else weights / weights.sum()
    parts = torch.stack([torch.softmax(t, -1) if mode == "prob" else t for t in logits])
    return (parts * w.view(-1, *[1] * logits[0].dim())).sum(0)


def linear_composite(features, weights, bias, activation):
    return ACTS[activation](F.linear(torch.cat(features, -1), torch.cat(weights, 1), bias))


def check(fn, composite, tensors, dtype):
    """fn and composite take the same list of leaf tensors."""
    leaves = [t.to(dtype).requires_grad_() for t in tensors]
    wide = [t.double().requires_grad_() for t in tensors]
    plain = [t.to(dtype).requires_grad_() for t in tensors]
    out, ref, comp = fn(leaves), composite(wide), composite(plain)
    assert_close("out", out, comp, ref, dtype)
    if out.numel():
        g = torch.randn_like(ref)
        for a, c, r in zip(torch.autograd.grad(out, leaves, g.to(dtype), allow_unused=True),
                           torch.autograd.grad(comp, plain, g.to(dtype), allow_unused=True),
                           torch.autograd.grad(ref, wide, g, allow_unused=True)):
            assert_close("grad", a, c, r, dtype)


DECISION_CASES = [(3, (4, 10)), (1, (5, 7)), (8, (2, 3, 13)), (2, (0, 5)), (4, (3, 1000))]


@pytest.mark.parametrize("mode", ["prob", "logit"])
@pytest.mark.parametrize("M,shape", DECISION_CASES, ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_decision_fusion(backend, M, shape, mode):
    logits = [3 * torch.randn(shape) for _ in range(M)]
    weights = torch.rand(M) + 0.1
    check(lambda t: mmkernels.decision_fusion(t[:M], t[M], mode=mode, backend=backend),
          lambda t: decision_composite(t[:M], t[M], mode), [*logits, weights], torch.float32)
    out = mmkernels.decision_fusion(logits, mode=mode, backend=backend)  # uniform weights
    torch.testing.assert_close(out, decision_composite(logits, None, mode))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_decision_fusion_fp16(backend):
    logits = [3 * torch.randn(6, 33) for _ in range(3)]
    check(lambda t: mmkernels.decision_fusion(t[:3], t[3], backend=backend), lambda t: decision_composite(t[:3], t[3], "prob"),
          [*logits, torch.rand(3) + 0.1], torch.float16)


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
    logits = [torch.randn(3, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    w = torch.tensor([0.3, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, w: mmkernels.decision_fusion([a, b], w, backend=backend), (*logits, w))
    f = [torch.randn(3, d, dtype=torch.float64, requires_grad=True) for d in (2, 3)]
    W = [torch.randn(4, d, dtype=torch.float64, requires_grad=True) for d in (2, 3)]
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f0, f1, w0, w1, b: mmkernels.linear_fusion([f0, f1], [w0, w1], b, activation="silu", backend=backend), (*f, *W, b))


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_opcheck_decision_fusion(backend):
    logits = [torch.randn(4, 7, requires_grad=True) for _ in range(3)]
    w = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    torch.library.opcheck(torch.ops.mmkernels.decision_fusion.default, [logits, w, True, backend])


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
    (lambda: mmkernels.decision_fusion([]), "logits must be a non-empty list of tensors"),
    (lambda: mmkernels.decision_fusion([torch.randn(2, 3), torch.randn(2, 4)]), "logits[1] must have the shape (2, 3) of logits[0], got (2, 4)"),
    (lambda: mmkernels.decision_fusion([torch.randn(2, 3)], mode="vote"), "mode must be 'prob' or 'logit', got 'vote'"),
    (lambda: mmkernels.decision_fusion([torch.randn(2, 3)] * 2, torch.tensor([1.0, -1.0])), "weights must be finite and >= 0 with a positive sum, got [1.0, -1.0]"),
    (lambda: mmkernels.decision_fusion([torch.randn(2, 3)] * 2, torch.ones(3)), "weights must have shape (2,), one per modality, got (3,)"),
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


def test_decision_fusion_layer_learns_its_weights():
    layer = mmkernels.nn.DecisionFusion(2)
    good, bad = torch.randn(16, 4), torch.randn(16, 4)
    labels = good.argmax(-1)
    opt = torch.optim.SGD(layer.parameters(), lr=2.0)
    for _ in range(20):
        loss = torch.nn.functional.nll_loss(layer([good * 4, bad * 4]).log(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.softmax(layer.weight_logits, 0)[0] > 0.8  # it learned to trust the good modality


def gated_composite(x_a, x_b, wa, wb, wz, ba, bb, bz):
    z = torch.sigmoid(F.linear(torch.cat([x_a, x_b], -1), wz, bz))
    return z * torch.tanh(F.linear(x_a, wa, ba)) + (1 - z) * torch.tanh(F.linear(x_b, wb, bb))


@pytest.mark.parametrize("lead,Da,Db,N,bias", [((6,), 8, 12, 5, True), ((2, 3), 7, 7, 9, False), ((0,), 4, 5, 3, True), ((1,), 1, 3, 1, True), ((33,), 40, 20, 17, True)], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_gated_fusion(backend, lead, Da, Db, N, bias):
    tensors = [torch.randn(*lead, Da), torch.randn(*lead, Db), torch.randn(N, Da), torch.randn(N, Db), torch.randn(N, Da + Db)]
    tensors += [torch.randn(N) for _ in range(3)] if bias else []

    def split(t):
        return (*t[:5], *(t[5:] if bias else [None] * 3))

    check(lambda t: mmkernels.gated_fusion(*split(t), backend=backend), lambda t: gated_composite(*split(t)), tensors, torch.float32)


def test_gated_fusion_fp16_gradcheck_opcheck():
    tensors = [torch.randn(5, 6), torch.randn(5, 4), torch.randn(3, 6), torch.randn(3, 4), torch.randn(3, 10), torch.randn(3), torch.randn(3), torch.randn(3)]
    check(lambda t: mmkernels.gated_fusion(*t), lambda t: gated_composite(*t), tensors, torch.float16)
    wide = [t.double().requires_grad_() for t in tensors]
    assert torch.autograd.gradcheck(lambda *t: mmkernels.gated_fusion(*t, backend="cpu"), wide)
    torch.library.opcheck(torch.ops.mmkernels.gated_fusion.default, [*[t.requires_grad_() for t in tensors], "cpu"])


def test_gated_multimodal_unit_layer_and_errors():
    layer = mmkernels.nn.GatedMultimodalUnit(6, 4, 3)
    x_a, x_b = torch.randn(2, 5, 6), torch.randn(2, 5, 4)
    expected = gated_composite(x_a, x_b, layer.proj_a.weight, layer.proj_b.weight, layer.gate.weight, layer.proj_a.bias, layer.proj_b.bias, layer.gate.bias)
    torch.testing.assert_close(layer(x_a, x_b), expected)
    with pytest.raises(ValueError, match=r"weight_z must have shape \(3, 10\), got \(3, 9\)"):
        mmkernels.gated_fusion(x_a, x_b, layer.proj_a.weight, layer.proj_b.weight, torch.randn(3, 9))
    with pytest.raises(ValueError, match=r"x_b must have the leading dims \(2, 5\) of x_a"):
        mmkernels.gated_fusion(x_a, x_b[:1], layer.proj_a.weight, layer.proj_b.weight, layer.gate.weight)


def gated_residual_composite(x, h, w, b, gate, row_mask):
    return x + torch.tanh(gate) * row_mask.unsqueeze(-1) * F.linear(h, w, b)


@pytest.mark.parametrize("lead,N,K,bias", [((2, 5), 8, 12, True), ((7,), 33, 17, False), ((0,), 4, 4, True)], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_gated_residual_linear(backend, lead, N, K, bias):
    row_mask = (torch.rand(lead) < 0.7).float()
    tensors = [torch.randn(*lead, N), torch.randn(*lead, K), torch.randn(N, K) / K**0.5, torch.tensor([0.6])] + ([torch.randn(N)] if bias else [])
    b = lambda t: t[4] if bias else None
    check(lambda t: mmkernels.ops.gated_residual_linear(t[0], t[1], t[2], b(t), t[3], row_mask, backend=backend),
          lambda t: gated_residual_composite(t[0], t[1], t[2], b(t), t[3], row_mask), tensors, torch.float32)


def test_gated_residual_linear_opcheck_and_errors():
    x, h, w = torch.randn(6, 8), torch.randn(6, 5), torch.randn(8, 5)
    for backend in ("cpu", "triton"):
        torch.library.opcheck(torch.ops.mmkernels.gated_residual_linear.default,
                              [x.requires_grad_(), h.requires_grad_(), w.requires_grad_(), None, torch.tensor([0.3], requires_grad=True), torch.ones(6), backend])
    with pytest.raises(ValueError, match=r"gate must be a \(1,\) tensor"):
        mmkernels.ops.gated_residual_linear(x, h, w, gate=torch.tensor(0.3))
    with pytest.raises(ValueError, match=r"row_mask must have shape \(6,\)"):
        mmkernels.ops.gated_residual_linear(x, h, w, gate=torch.tensor([0.3]), row_mask=torch.ones(5))
