"""Stock layers that are not installed here, as their packages define them."""
import torch
from torch import nn


class AttentionFusionModule(nn.Module):
    """torchmultimodal.modules.fusions.attention_fusion.AttentionFusionModule, as that package
    defines it (it is not installed here)."""

    def __init__(self, channel_to_encoder_dim, encoding_projection_dim=None):
        super().__init__()
        attn_in_dim = sum(channel_to_encoder_dim.values())
        self.attention = nn.Sequential(nn.Linear(attn_in_dim, len(channel_to_encoder_dim)), nn.Softmax(-1))
        if encoding_projection_dim is None:
            encoding_projection_dim = min(channel_to_encoder_dim.values())
        self.encoding_projection = nn.ModuleDict({c: nn.Linear(channel_to_encoder_dim[c], encoding_projection_dim) for c in sorted(channel_to_encoder_dim)})

    def forward(self, embeddings):
        concatenated_in = torch.cat([embeddings[k] for k in sorted(embeddings.keys())], dim=-1)
        attention_weights = self.attention(concatenated_in)
        projected = [projection(embeddings[channel]) for channel, projection in self.encoding_projection.items()]
        projected = [attention_weights[:, i].unsqueeze(-1) * p for i, p in enumerate(projected)]
        return torch.sum(torch.stack(projected), dim=0)


AttentionFusionModule.__module__ = "torchmultimodal.modules.fusions.attention_fusion"
