"""What every backend shares: the facts a backend judges inputs by, and the accumulation dtype."""
from dataclasses import dataclass

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every input dtype but float64, which keeps its precision (for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Problem:
    """The facts about one call that decide which backends can run it."""

    op: str  # "cross_attention" or "concat_weighted_fusion"
    device: torch.device
    dtype: torch.dtype
    head_dim: int = 0  # cross_attention
    modalities: int = 0  # concat_weighted_fusion

    @staticmethod
    def of(op: str, *tensors: torch.Tensor, head_dim: int = 0, modalities: int = 0) -> "Problem":
        t = tensors[0]
        return Problem(op, t.device, t.dtype, head_dim, modalities)
