"""CoAttention: LXMERT-style bidirectional cross-attention between two modalities."""
from torch import Tensor, nn

from mmkernels.ops import co_attention


class CoAttention(nn.Module):
    """Each modality attends to the other: y_a = out_a(Attn(q_a(x_a), k_b(x_b), v_b(x_b))) and
    y_b likewise, both directions in one co_attention call. x_a (B, La, dim_a), x_b (B, Lb, dim_b),
    batch first; lengths_a / lengths_b (B,) mark right padding on each side."""

    def __init__(self, dim_a: int, dim_b: int, num_heads: int, dim: int | None = None):
        super().__init__()
        dim = dim or dim_a
        if dim % num_heads:
            raise ValueError(f"CoAttention: dim must be a multiple of num_heads, got dim={dim}, num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv_a, self.qkv_b = nn.Linear(dim_a, 3 * dim), nn.Linear(dim_b, 3 * dim)
        self.out_a, self.out_b = nn.Linear(dim, dim_a), nn.Linear(dim, dim_b)

    def _heads(self, x, proj):
        B, L, _ = x.shape
        return proj(x).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # views, no copy

    def forward(self, x_a: Tensor, x_b: Tensor, lengths_a: Tensor | None = None,
                lengths_b: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if x_a.dim() != 3 or x_b.dim() != 3 or x_a.shape[0] != x_b.shape[0]:
            raise ValueError(f"CoAttention: x_a and x_b must be (B, L, dim) with one batch, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
        (q_a, k_a, v_a), (q_b, k_b, v_b) = self._heads(x_a, self.qkv_a), self._heads(x_b, self.qkv_b)
        o_a, o_b = co_attention(q_a, k_a, v_a, q_b, k_b, v_b, lengths_a=lengths_a, lengths_b=lengths_b)
        merge = lambda o: o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)
        return self.out_a(merge(o_a)), self.out_b(merge(o_b))
