"""gated_residual_linear (the gated cross-attention output projection) on every backend that runs here."""
import pytest
import torch
import torch.nn.functional as F

import mmkernels
from tolerance import check_against_composite as check


def gated_residual_composite(x, h, w, b, gate, row_mask):
    return x + torch.tanh(gate) * row_mask.unsqueeze(-1) * F.linear(h, w, b)


@pytest.mark.parametrize("lead,N,K,bias", [((2, 5), 8, 12, True), ((7,), 33, 17, False), ((0,), 4, 4, True)], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_gated_residual_linear(backend, lead, N, K, bias):
    row_mask = (torch.rand(lead) < 0.7).float()
    tensors = [torch.randn(*lead, N), torch.randn(*lead, K), torch.randn(N, K) / K**0.5, torch.tensor([0.6])] + ([torch.randn(N)] if bias else [])
    b = lambda t: t[4] if bias else None
    check(lambda t: mmkernels.ops.gated_residual_linear(t[0], t[1], t[2], b(t), gate=t[3], row_mask=row_mask, backend=backend),
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
