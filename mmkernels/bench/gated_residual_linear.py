"""gated_residual_linear cases (the gated cross-attention output projection of Flamingo, IDEFICS
and Llama 3.2 Vision) and the peers a user would pick instead."""
import dataclasses

import torch
import torch.nn.functional as F

import mmkernels
from mmkernels.bench.backends import contenders


@dataclasses.dataclass
class GatedResidualCase:
    rows: int
    K: int
    N: int
    mode: str
    memory_only: bool = False

    op = "gated_residual_linear"

    @property
    def shape(self):
        return f"rows{self.rows} K{self.K} N{self.N}"

    def inputs(self, device, dtype):
        g = torch.Generator().manual_seed(0)
        x, h = torch.randn(self.rows, self.N, generator=g), torch.randn(self.rows, self.K, generator=g)
        weight = torch.randn(self.N, self.K, generator=g) / self.K**0.5
        row_mask = (torch.arange(self.rows) % 7 != 0).float()  # some text rows see no image
        return tuple(t.to(device, dtype) for t in (x, h, weight, torch.zeros(self.N), torch.tensor([0.5]), row_mask))

    def differentiable(self, inputs):
        leaves = [t.detach().requires_grad_() for t in inputs[:5]]
        return leaves, (*leaves, inputs[5])

    def bytes_moved(self, dtype) -> float:
        size = torch.finfo(dtype).bits // 8
        return (2 * self.N + self.K) * self.rows * size * (3.0 if self.mode == "fwd+bwd" else 1.0)


def residual_eager(x, h, weight, bias, gate, row_mask):
    """out_proj, then the tanh gate, the row mask and the residual: four passes over the rows."""
    return x + torch.tanh(gate) * row_mask.unsqueeze(-1) * F.linear(h, weight, bias)


def providers(case, device, dtype, full: bool):
    out = {"eager": residual_eager}
    for name in contenders(case.op, device, dtype):
        out[f"mmkernels-{name}"] = (lambda backend: lambda x, h, w, b, g, m: mmkernels.ops.gated_residual_linear(
            x, h, w, b, gate=g, row_mask=m, backend=backend))(name)
    out["compile"] = torch.compile(residual_eager, dynamic=False)
    return out
