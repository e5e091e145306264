"""linear_fusion cases and the peers a user would pick instead."""
import dataclasses

import torch
import torch.nn.functional as F

import mmkernels
from mmkernels.bench.backends import contenders


@dataclasses.dataclass
class LinearCase:
    M: int
    rows: int
    D: int
    N: int
    mode: str
    activation: str = "gelu"
    memory_only: bool = False

    op = "linear_fusion"

    @property
    def shape(self):
        return f"M{self.M} rows{self.rows} D{self.D} N{self.N} {self.activation}"

    def inputs(self, device, dtype):
        g = torch.Generator().manual_seed(0)
        features = [torch.randn(self.rows, self.D, generator=g).to(device, dtype) for _ in range(self.M)]
        weights = [(torch.randn(self.N, self.D, generator=g) / (self.M * self.D) ** 0.5).to(device, dtype) for _ in range(self.M)]
        return features, weights, torch.zeros(self.N).to(device, dtype)

    def differentiable(self, inputs):
        features, weights, bias = inputs
        leaves = [t.detach().requires_grad_() for t in (*features, *weights, bias)]
        return leaves, (leaves[: self.M], leaves[self.M : 2 * self.M], leaves[-1])

    def bytes_moved(self, dtype) -> float:
        size = torch.finfo(dtype).bits // 8
        return (self.M * self.D + self.N) * self.rows * size * (3.0 if self.mode == "fwd+bwd" else 1.0)


def linear_eager(features, weights, bias, activation="gelu"):
    """cat -> F.linear -> activation: the concatenation is a real copy."""
    return getattr(F, activation)(F.linear(torch.cat(features, -1), torch.cat(weights, 1), bias))


def providers(case, device, dtype, full: bool):
    eager = lambda f, w, b: linear_eager(f, w, b, case.activation)
    out = {"eager": eager}
    for name in contenders(case.op, device, dtype, modalities=case.M):
        out[f"mmkernels-{name}"] = (lambda backend: lambda f, w, b: mmkernels.linear_fusion(
            f, w, b, activation=case.activation, backend=backend))(name)
    out["compile"] = torch.compile(eager, dynamic=False)  # what a user would try first, on any device
    return out
