"""GatedCrossAttention: the Flamingo / IDEFICS / Llama-3.2-Vision cross-attention block."""
import torch
from torch import Tensor, nn

from mmkernels.nn.cross_modal_attention import CrossModalAttention
from mmkernels.ops import gated_residual_linear


class GatedCrossAttention(nn.Module):
    """y = x + tanh(attn_gate) * (row_mask * CrossAttn(norm(x), media)),
    out = y + tanh(ff_gate) * FF(ff_norm(y)); both gates start at 0, so a block inserted into a
    pretrained language model leaves it unchanged until trained.

    x: (B, Lq, dim) text; media: (B, Lk, media_dim) image/audio tokens; media_lengths (B,) or
    media_padding_mask (B, Lk, True = ignore) for ragged media; row_mask (B, Lq): rows that may
    see media (Llama 3.2's full-text-row mask). The output projection, gate, row mask and residual
    are one gated_residual_linear (fused into the GEMM's epilogue on the triton backend)."""

    def __init__(self, dim: int, num_heads: int, media_dim: int | None = None, ff_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = CrossModalAttention(dim, num_heads, dropout=dropout, kdim=media_dim, vdim=media_dim, batch_first=True)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    @classmethod
    def from_module(cls, module) -> "GatedCrossAttention":
        """From a block with the same layout whose `attn` is an nn.MultiheadAttention (batch_first)."""
        attn = module.attn
        layer = cls(attn.embed_dim, attn.num_heads, media_dim=attn.kdim, ff_mult=module.ff[0].out_features // attn.embed_dim, dropout=attn.dropout)
        layer.load_state_dict(module.state_dict())
        return layer.to(attn.out_proj.weight.device, attn.out_proj.weight.dtype)

    def forward(self, x: Tensor, media: Tensor, media_lengths: Tensor | None = None, media_padding_mask: Tensor | None = None,
                row_mask: Tensor | None = None) -> Tensor:
        if x.dim() != 3 or media.dim() != 3 or x.shape[0] != media.shape[0]:
            raise ValueError(f"GatedCrossAttention: x must be (B, Lq, dim) and media (B, Lk, media_dim), got {tuple(x.shape)} and {tuple(media.shape)}")
        merged, _, _ = self.attn.attend(self.norm(x), media, media, key_padding_mask=media_padding_mask, kv_lengths=media_lengths)
        proj = self.attn.out_proj
        y = gated_residual_linear(x, merged, proj.weight, proj.bias, gate=self.attn_gate, row_mask=row_mask)  # out_proj + gate + mask + residual
        return y + torch.tanh(self.ff_gate) * self.ff(self.ff_norm(y))
