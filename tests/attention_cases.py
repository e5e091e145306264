"""Attention inputs shared by the tests of every backend: the edge cases of DESIGN.md §4."""
import dataclasses

import torch

import mmkernels
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
    ranges: bool = False  # per-row kv_start/kv_end: two "images", row 0 sees nothing, some random spans
    causal: bool = False
    dropout: float = 0.0

    def __str__(self):
        flags = (self.kv_lengths, self.key_padding_mask, self.q_lengths, self.empty_row, self.ranges, self.causal, self.dropout)
        masks = "".join(c for c, on in zip("KMQERCP", flags) if on)
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
        if self.ranges:
            kw["kv_start"], kw["kv_end"] = image_ranges(self.B, self.Lq, self.Lk, device)
        if self.causal:
            kw["causal"] = True
        if self.dropout:
            kw["dropout_p"] = self.dropout
        return q, k, v, kw


def image_ranges(B, Lq, Lk, device="cpu"):
    """kv_start, kv_end (B, Lq) of an interleaved two-image prompt: row 0 sees nothing (a BOS
    token), the first half of the text sees image 1 (the first third of the keys), the rest image 2
    (the last third; the middle third is padding nobody sees), and every 7th row a random span,
    out-of-range and reversed values included (clamped, or empty)."""
    i = torch.arange(Lq, device=device)
    start = torch.where(i < Lq // 2, 0, 2 * Lk // 3).expand(B, Lq).clone()
    end = torch.where(i < Lq // 2, Lk // 3, Lk + 5).expand(B, Lq).clone()
    start[:, 0] = end[:, 0] = 3
    odd = i % 7 == 3
    start[:, odd] = torch.randint(-3, Lk, (B, int(odd.sum())), device=device)
    end[:, odd] = torch.randint(0, Lk + 10, (B, int(odd.sum())), device=device)
    return start, end.to(torch.int32)


SEED = 1234  # tests with dropout draw the same Philox key for every path: torch.manual_seed(SEED) first


def dropout_keep(q, k, dropout_p):
    """The keep mask cross_attention draws right after torch.manual_seed(SEED)."""
    torch.manual_seed(SEED)
    seed = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=q.device)
    return reference.dropout_keep(seed, q.shape[0], q.shape[1], q.shape[2], k.shape[2], dropout_p)


def composite(q, k, v, kv_lengths=None, key_padding_mask=None, q_lengths=None, kv_start=None, kv_end=None, causal=False,
              dropout_p=0.0, scale=None):
    """The plain PyTorch composite in q's dtype (no upcast): the error baseline. Hidden keys must
    be finite here (the composite multiplies their zero probabilities)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kx = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    vx = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    scores = (q @ kx.transpose(-1, -2)) * scale
    visible = reference.visible_keys(q, k, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal)
    probs = torch.nan_to_num(torch.softmax(scores.masked_fill(~visible, float("-inf")), -1), nan=0.0)
    if dropout_p:
        probs = probs * dropout_keep(q, k, dropout_p) / (1 - dropout_p)
    return probs @ vx


def reference_fp64(q, k, v, **kw):
    """The oracle: the reference backend in float64 (the same dropout draw as the kernels)."""
    torch.manual_seed(SEED)
    return mmkernels.cross_attention(q.double(), k.double(), v.double(), backend="reference", **kw)


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
    Case(D=59, ranges=True, kv_lengths=True),
    Case(D=111, Lq=33, Lk=40, causal=True, key_padding_mask=True),
    Case(D=160, Lq=20, Lk=31, causal=True, q_lengths=True, layout="blhd"),
    Case(Lq=70, Lk=200, ranges=True, causal=True, key_padding_mask=True),
    Case(Lq=45, Lk=77, dropout=0.25, ranges=True),
    Case(D=192, Lq=12, Lk=40, causal=True, dropout=0.1, kv_lengths=True),
    Case(D=224, Lq=10, Lk=37, key_padding_mask=True, layout="blhd"),
]
