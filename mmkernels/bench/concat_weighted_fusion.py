"""concat_weighted_fusion cases and the peers a user would pick instead."""
import dataclasses

import torch

import mmkernels
from mmkernels.bench.backends import contenders


@dataclasses.dataclass
class ConcatWeightedFusionCase:
    M: int
    rows: int
    D: int
    mode: str
    memory_only: bool = False

    op = "concat_weighted_fusion"

    @property
    def shape(self):
        return f"M{self.M} rows{self.rows} D{self.D}"

    def inputs(self, device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        features = [torch.randn(self.rows, self.D, generator=g).to(device, dtype) for _ in range(self.M)]
        weight = (torch.randn(self.M, self.M * self.D, generator=g) / (self.M * self.D) ** 0.5).to(device, dtype)
        bias = torch.zeros(self.M).to(device, dtype)
        return features, weight, bias

    def differentiable(self, inputs):
        features, weight, bias = inputs
        leaves = [t.detach().requires_grad_() for t in (*features, weight, bias)]
        return leaves, (leaves[:-2], leaves[-2], leaves[-1])

    def bytes_moved(self, dtype) -> float:
        """Forward: every feature read once, the output written once (the backward roughly 3x)."""
        size = torch.finfo(dtype).bits // 8
        fwd = (self.M + 1) * self.rows * self.D * size
        return fwd * (3.0 if self.mode == "fwd+bwd" else 1.0)


def eager(features, weight, bias):
    """cat -> linear -> softmax -> weighted sum: the composite a model writes by hand."""
    w = torch.softmax(torch.nn.functional.linear(torch.cat(features, -1), weight, bias), -1)
    return (torch.stack(features, -1) * w.unsqueeze(-2)).sum(-1)


def providers(case, device, dtype, full: bool):
    out = {"eager": eager}
    for name in contenders("concat_weighted_fusion", device, dtype, modalities=case.M):
        out[f"mmkernels-{name}"] = (lambda backend: lambda f, w, b: mmkernels.concat_weighted_fusion(f, w, b, backend=backend))(name)
    out["compile"] = torch.compile(eager, dynamic=False)  # what a user would try first, on any device
    return out
