"""gated_fusion (the gated multimodal unit) on every backend that runs here, against float64 composites."""
import pytest
import torch
import torch.nn.functional as F

import mmkernels
from tolerance import check_against_composite as check


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
