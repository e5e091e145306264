"""DecisionFusion: late fusion of per-modality predictions with learned weights."""
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mmkernels.ops import decision_fusion


class DecisionFusion(nn.Module):
    """Late fusion of M per-modality predictions: sum_m w_m softmax(logits_m) (mode="prob") or
    sum_m w_m logits_m (mode="logit"), with w = softmax(weight_logits) learned (or fixed)."""

    def __init__(self, num_modalities: int, mode: str = "prob", learnable: bool = True):
        super().__init__()
        self.mode = mode
        logits = torch.zeros(num_modalities)
        self.weight_logits = nn.Parameter(logits) if learnable else nn.Buffer(logits)

    def forward(self, logits: Sequence[Tensor]) -> Tensor:
        return decision_fusion(list(logits), torch.softmax(self.weight_logits, 0), mode=self.mode)
