"""decision_fusion on every backend that runs here, against float64 composites."""
import pytest
import torch

import mmkernels
from tolerance import check_against_composite as check


def decision_composite(logits, weights, mode):
    w = torch.full((len(logits),), 1 / len(logits), dtype=logits[0].dtype) if weights is None else weights / weights.sum()
    parts = torch.stack([torch.softmax(t, -1) if mode == "prob" else t for t in logits])
    return (parts * w.view(-1, *[1] * logits[0].dim())).sum(0)


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


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck(backend):
    logits = [torch.randn(3, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    w = torch.tensor([0.3, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, w: mmkernels.decision_fusion([a, b], w, backend=backend), (*logits, w))


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_opcheck_decision_fusion(backend):
    logits = [torch.randn(4, 7, requires_grad=True) for _ in range(3)]
    w = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    torch.library.opcheck(torch.ops.mmkernels.decision_fusion.default, [logits, w, True, backend])


@pytest.mark.parametrize("call,message", [
    (lambda: mmkernels.decision_fusion([]), "logits must be a non-empty list of tensors"),
    (lambda: mmkernels.decision_fusion([torch.randn(2, 3), torch.randn(2, 4)]), "logits[1] must have the shape (2, 3) of logits[0], got (2, 4)"),
    (lambda: mmkernels.decision_fusion([torch.randn(2, 3)], mode="vote"), "mode must be 'prob' or 'logit', got 'vote'"),
    (lambda: mmkernels.decision_fusion([torch.randn(2, 3)] * 2, torch.tensor([1.0, -1.0])), "weights must be finite and >= 0 with a positive sum, got [1.0, -1.0]"),
    (lambda: mmkernels.decision_fusion([torch.randn(2, 3)] * 2, torch.ones(3)), "weights must have shape (2,), one per modality, got (3,)"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_errors(call, message):
    with pytest.raises((ValueError, mmkernels.BackendUnavailable), match=__import__("re").escape(message)):
        call()


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
