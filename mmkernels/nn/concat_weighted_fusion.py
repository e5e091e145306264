"""ConcatWeightedFusion: torchmultimodal's AttentionFusionModule, fused."""
from typing import Dict

import torch
from torch import Tensor, nn

from mmkernels.ops import concat_weighted_fusion


class ConcatWeightedFusion(nn.Module):
    """w = softmax(Linear(concat(embeddings))) over channels, then sum_c w_c * Linear_c(embedding_c).

    State-dict compatible with torchmultimodal's AttentionFusionModule: `attention.0.weight/bias`
    and `encoding_projection.<channel>.weight/bias`, channels in sorted order, the projection dim
    defaulting to the smallest encoder dim. forward takes a dict channel -> (B, D_c) or
    (B, L, D_c). The gate runs over the raw embeddings without building their concatenation.
    """

    def __init__(self, channel_to_encoder_dim: dict[str, int], encoding_projection_dim: int | None = None):
        super().__init__()
        if not channel_to_encoder_dim:
            raise ValueError("ConcatWeightedFusion: channel_to_encoder_dim must name at least one channel")
        self.channels = sorted(channel_to_encoder_dim)
        dims = [channel_to_encoder_dim[c] for c in self.channels]
        self.attention = nn.Sequential(nn.Linear(sum(dims), len(dims)), nn.Softmax(-1))
        projection_dim = encoding_projection_dim if encoding_projection_dim is not None else min(dims)
        self.encoding_projection = nn.ModuleDict({c: nn.Linear(channel_to_encoder_dim[c], projection_dim) for c in self.channels})

    @classmethod
    def from_module(cls, module) -> "ConcatWeightedFusion":
        """From a torchmultimodal AttentionFusionModule (or anything with its layout)."""
        dims = {c: proj.in_features for c, proj in module.encoding_projection.items()}
        projection_dim = next(iter(module.encoding_projection.values())).out_features
        layer = cls(dims, projection_dim).to(module.attention[0].weight.device, module.attention[0].weight.dtype)
        layer.load_state_dict(module.state_dict())
        return layer

    def forward(self, embeddings: Dict[str, Tensor]) -> Tensor:
        channels = list(embeddings.keys())
        channels.sort()
        if channels != self.channels:
            raise ValueError("ConcatWeightedFusion: embeddings must have the channels " + str(self.channels) + ", got " + str(channels))
        if torch.jit.is_scripting():
            return self._composite(embeddings)  # TorchScript cannot call the Python op layer
        return self._fused(embeddings)

    @torch.jit.unused
    def _fused(self, embeddings: Dict[str, Tensor]) -> Tensor:
        features = [embeddings[c] for c in self.channels]
        values = [self.encoding_projection[c](embeddings[c]) for c in self.channels]
        gate = self.attention[0]
        return concat_weighted_fusion(features, gate.weight, gate.bias, values=values, output="sum")

    def _composite(self, embeddings: Dict[str, Tensor]) -> Tensor:
        """AttentionFusionModule's own computation, in TorchScript."""
        weights = self.attention(torch.cat([embeddings[c] for c in self.channels], dim=-1))
        out = torch.zeros(0)
        i = 0
        for channel, projection in self.encoding_projection.items():
            term = weights[..., i : i + 1] * projection(embeddings[channel])
            out = term if i == 0 else out + term
            i += 1
        return out
