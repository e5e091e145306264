"""decision_fusion cases and the peers a user would pick instead."""
import dataclasses

import torch

import mmkernels
from mmkernels.bench.backends import contenders


@dataclasses.dataclass
class DecisionCase:
    M: int
    rows: int
    C: int
    mode: str
    memory_only: bool = False

    op = "decision_fusion"

    @property
    def shape(self):
        return f"M{self.M} rows{self.rows} C{self.C}"

    def inputs(self, device, dtype):
        g = torch.Generator().manual_seed(0)
        logits = [(3 * torch.randn(self.rows, self.C, generator=g)).to(device, dtype) for _ in range(self.M)]
        return logits, torch.rand(self.M, generator=g).to(device) + 0.1

    def differentiable(self, inputs):
        logits, weights = inputs
        leaves = [t.detach().requires_grad_() for t in (*logits, weights)]
        return leaves, (leaves[:-1], leaves[-1])

    def bytes_moved(self, dtype) -> float:
        size = torch.finfo(dtype).bits // 8
        return (self.M + 1) * self.rows * self.C * size * (3.0 if self.mode == "fwd+bwd" else 1.0)


def decision_eager(logits, weights):
    """stack -> softmax -> weighted mean, as written by hand."""
    w = weights / weights.sum()
    return (torch.softmax(torch.stack(logits), -1) * w.view(-1, 1, 1)).sum(0)


def providers(case, device, dtype, full: bool):
    out = {"eager": decision_eager}
    for name in contenders(case.op, device, dtype, modalities=case.M):
        out[f"mmkernels-{name}"] = (lambda backend: lambda logits, w: mmkernels.decision_fusion(logits, w, backend=backend))(name)
    out["compile"] = torch.compile(decision_eager, dynamic=False)  # what a user would try first, on any device
    return out
