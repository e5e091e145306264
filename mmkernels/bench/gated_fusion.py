"""gated_fusion cases (the gated multimodal unit) and the peers a user would pick instead."""
import dataclasses

import torch
import torch.nn.functional as F

import mmkernels
from mmkernels.bench.backends import contenders


@dataclasses.dataclass
class GatedFusionCase:
    rows: int
    Da: int
    Db: int
    N: int
    mode: str
    memory_only: bool = False

    op = "gated_fusion"

    @property
    def shape(self):
        return f"rows{self.rows} Da{self.Da} Db{self.Db} N{self.N}"

    def inputs(self, device, dtype):
        g = torch.Generator().manual_seed(0)
        r = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(device, dtype)
        return (r(self.rows, self.Da) * self.Da**0.5, r(self.rows, self.Db) * self.Db**0.5,
                r(self.N, self.Da), r(self.N, self.Db), r(self.N, self.Da + self.Db), r(self.N), r(self.N), r(self.N))

    def differentiable(self, inputs):
        leaves = [t.detach().requires_grad_() for t in inputs]
        return leaves, leaves

    def bytes_moved(self, dtype) -> float:
        size = torch.finfo(dtype).bits // 8
        return (self.Da + self.Db + self.N) * self.rows * size * (3.0 if self.mode == "fwd+bwd" else 1.0)


def gated_eager(x_a, x_b, w_a, w_b, w_z, b_a, b_b, b_z):
    """Three nn.Linear calls over the modalities and their concatenation, as written by hand."""
    z = torch.sigmoid(F.linear(torch.cat([x_a, x_b], -1), w_z, b_z))
    return z * torch.tanh(F.linear(x_a, w_a, b_a)) + (1 - z) * torch.tanh(F.linear(x_b, w_b, b_b))


def providers(case, device, dtype, full: bool):
    out = {"eager": gated_eager}
    for name in contenders(case.op, device, dtype, modalities=2):
        out[f"mmkernels-{name}"] = (lambda backend: lambda *t: mmkernels.gated_fusion(*t, backend=backend))(name)
    out["compile"] = torch.compile(gated_eager, dynamic=False)
    return out
