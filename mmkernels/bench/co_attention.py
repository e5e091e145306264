"""co_attention cases: one launch for both directions against two cross_attention calls."""
import dataclasses

import torch

import mmkernels
from mmkernels.bench.backends import contenders
from mmkernels.bench.cross_attention import eager


@dataclasses.dataclass
class CoAttentionCase:
    """Both directions between two modalities: one co_attention launch against two calls."""

    B: int
    H: int
    La: int
    Lb: int
    D: int
    mode: str
    memory_only: bool = False

    op = "co_attention"
    padded = False

    @property
    def shape(self):
        return f"B{self.B} H{self.H} La{self.La} Lb{self.Lb} D{self.D}"

    def inputs(self, device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        make = lambda L: torch.randn(self.B, self.H, L, self.D, generator=g).to(device, dtype)
        return make(self.La), make(self.La), make(self.La), make(self.Lb), make(self.Lb), make(self.Lb)

    def differentiable(self, inputs):
        leaves = [t.detach().requires_grad_() for t in inputs]
        return leaves, leaves

    def lengths_label(self, lengths):
        return "-"

    def flops(self, lengths) -> float:
        fwd = 2 * 4.0 * self.B * self.H * self.La * self.Lb * self.D
        return fwd * (3.5 if self.mode == "fwd+bwd" else 1.0)


def providers(case, device, dtype, full: bool):
    """Outputs are concatenated so every provider returns one tensor to check."""
    both = lambda a, b: torch.cat([a.flatten(), b.flatten()])
    out = {"eager": lambda qa, ka, va, qb, kb, vb: both(eager(qa, kb, vb, None), eager(qb, ka, va, None))}
    for name in contenders("co_attention", device, dtype, head_dim=case.D):
        out[f"mmkernels-{name}"] = (lambda backend: lambda *t: both(*mmkernels.co_attention(*t, backend=backend)))(name)
        out[f"two-calls-{name}"] = (lambda backend: lambda qa, ka, va, qb, kb, vb: both(
            mmkernels.cross_attention(qa, kb, vb, backend=backend), mmkernels.cross_attention(qb, ka, va, backend=backend)))(name)
    return out
