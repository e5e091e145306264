"""decision_fusion and linear_fusion cases and the peers a user would pick instead."""
import dataclasses

import torch
import torch.nn.functional as F

import mmkernels
from mmkernels.backends import reasons
from mmkernels.backends.base import Problem


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
    if case.op == "decision_fusion":
        out = {"eager": decision_eager}
        call = lambda backend: lambda logits, w: mmkernels.decision_fusion(logits, w, backend=backend)
        problem = Problem.of(case.op, torch.empty(0, device=device, dtype=dtype), modalities=case.M)
    else:
        out = {"eager": lambda f, w, b: linear_eager(f, w, b, case.activation)}
        call = lambda backend: lambda f, w, b: mmkernels.linear_fusion(f, w, b, activation=case.activation, backend=backend)
        problem = Problem.of(case.op, torch.empty(0, device=device, dtype=dtype), modalities=case.M)
    for name, why in reasons(problem, explicit=True).items():
        if why is None and name != "reference" and not (name == "triton" and device.type == "cpu"):
            out[f"mmkernels-{name}"] = call(name)
    out["compile"] = torch.compile(out["eager"], dynamic=False)  # what a user would try first, on any device
    return out
