"""varlen_attention cases: packed sequences (flash-attn's layout) against what a user without
flash-attn writes instead: a loop of SDPA calls, one per sequence, or one SDPA call with a
block-diagonal mask over the packed batch."""
import dataclasses

import torch
import torch.nn.functional as F

import mmkernels


@dataclasses.dataclass
class VarlenCase:
    """`lengths` sequences packed end to end, causal self-attention within each."""

    lengths: tuple
    H: int
    D: int
    mode: str
    memory_only: bool = False

    op = "varlen_attention"

    @staticmethod
    def peers(case, device, dtype, full):
        return providers(case)

    @property
    def shape(self):
        return f"{len(self.lengths)} seqs of {min(self.lengths)}-{max(self.lengths)} (total {sum(self.lengths)}) H{self.H} D{self.D} causal"

    def inputs(self, device, dtype):
        g = torch.Generator().manual_seed(0)
        total = sum(self.lengths)
        q, k, v = (torch.randn(total, self.H, self.D, generator=g).to(device, dtype) for _ in range(3))
        cu = torch.tensor([0, *torch.tensor(self.lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        return q, k, v, cu

    def differentiable(self, inputs):
        q, k, v, cu = inputs
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        return leaves, (*leaves, cu)

    def lengths_label(self, _):
        return "packed"

    def flops(self, _) -> float:
        fwd = sum(2 * 2 * L * (L + 1) / 2 * self.D * self.H for L in self.lengths)
        return fwd * (3.5 if self.mode == "fwd+bwd" else 1.0)


def providers(case):
    bounds = [0, *torch.tensor(case.lengths).cumsum(0).tolist()]
    longest = max(case.lengths)

    def sdpa_loop(q, k, v, cu):
        outs = [F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)), is_causal=True).transpose(0, 1)
                for s, e in zip(bounds, bounds[1:])]
        return torch.cat(outs)

    def sdpa_mask(q, k, v, cu):
        seq = torch.repeat_interleave(torch.arange(len(case.lengths), device=q.device),
                                      torch.tensor(case.lengths, device=q.device))
        pos = torch.arange(q.shape[0], device=q.device)
        visible = (seq.view(-1, 1) == seq.view(1, -1)) & (pos.view(1, -1) <= pos.view(-1, 1))
        return F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)), attn_mask=visible).transpose(0, 1)

    def ours(q, k, v, cu):
        return mmkernels.varlen_attention(q, k, v, cu, cu, longest, longest, causal=True)

    return {"sdpa-loop": sdpa_loop, "sdpa": sdpa_mask, "mmkernels": ours}
