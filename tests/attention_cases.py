"""Attention inputs shared by the tests of every backend: the edge cases of DESIGN.md §4."""
import dataclasses

import torch

from mmkernels.backends import reference


@dataclasses.dataclass
class Case:
    B: int = 2
    Hq: int = 4
    Hkv: int = 2
    Lq: int = 37
    Lk: int = 129
    D: int = 64
    kv_lengths: bool = False
    key_padding_mask: bool = False
    q_lengths: bool = False
    empty_row: bool = False  # batch 0 sees no key at all
    layout: str = "bhld"  # or "blhd": a (B, L, H, D) tensor viewed with .transpose(1, 2)

    def __str__(self):
        masks = "".join(c for c, on in zip("KMQE", (self.kv_lengths, self.key_padding_mask, self.q_lengths, self.empty_row)) if on)
        return f"B{self.B}H{self.Hq}/{self.Hkv}q{self.Lq}k{self.Lk}d{self.D}{masks or '-'}{self.layout}"

    def make(self, dtype, device="cpu"):
        def tensor(H, L):
            if self.layout == "blhd":
                return torch.randn(self.B, L, H, self.D, dtype=dtype, device=device).transpose(1, 2)
            return torch.randn(self.B, H, L, self.D, dtype=dtype, device=device)

        q, k, v = tensor(self.Hq, self.Lq), tensor(self.Hkv, self.Lk), tensor(self.Hkv, self.Lk)
        kw = {}
        if self.kv_lengths or self.empty_row:
            lengths = torch.randint(1, self.Lk + 1, (self.B,), device=device)
            if self.empty_row and self.B:
                lengths[0] = 0
            kw["kv_lengths"] = lengths.to(torch.int32)
        if self.key_padding_mask:
            mask = torch.rand(self.B, self.Lk, device=device) < 0.3
            kw["key_padding_mask"] = mask
        if self.q_lengths:
            kw["q_lengths"] = torch.randint(0, self.Lq + 1, (self.B,), device=device)
        return q, k, v, kw


def composite(q, k, v, kv_lengths=None, key_padding_mask=None, q_lengths=None):
    """The plain PyTorch composite in q's dtype (no upcast): the error baseline."""
    scale = q.shape[-1] ** -0.5
    kx = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    vx = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    scores = (q @ kx.transpose(-1, -2)) * scale
    visible = reference._visible_keys(q, k, kv_lengths, key_padding_mask) & reference._valid_queries(q, q_lengths)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, -1), nan=0.0) @ vx


def reference_fp64(q, k, v, **kw):
    """The oracle: the reference backend in float64."""
    scale = q.shape[-1] ** -0.5
    out, _ = reference.cross_attention(q.double(), k.double(), v.double(), kw.get("kv_lengths"), kw.get("key_padding_mask"), kw.get("q_lengths"), scale)
    return out


EDGE_CASES = [
    Case(),
    Case(Lq=1, Lk=1),
    Case(Lq=1, Lk=577, kv_lengths=True),
    Case(Lq=129, Lk=1, q_lengths=True),
    Case(Hq=4, Hkv=1, Lq=37, Lk=129, kv_lengths=True, key_padding_mask=True, q_lengths=True),
    Case(Hq=6, Hkv=3, empty_row=True, layout="blhd"),
    Case(B=3, kv_lengths=True, layout="blhd", Lk=577),
    Case(B=0),
    Case(D=32, key_padding_mask=True),
    Case(D=72, kv_lengths=True),
    Case(D=80, q_lengths=True),
    Case(D=96, Lq=17, Lk=33),
    Case(D=128, kv_lengths=True, empty_row=True),
    Case(D=256, Lq=9, Lk=65, key_padding_mask=True),
]
