"""LinearFusion: nn.Linear over concatenated modalities, without the concatenation."""
from collections.abc import Sequence

from torch import Tensor, nn

from mmkernels.limits import ACTIVATIONS
from mmkernels.ops import linear_fusion


class LinearFusion(nn.Module):
    """act(Linear(concat(features))) without building the concatenation.

    Parameters are those of the nn.Linear(sum(dims), out_features) it replaces (`weight`,
    `bias`), so that layer's state_dict loads unchanged; each modality uses a column slice of
    `weight` (a view, no copy)."""

    def __init__(self, dims: Sequence[int], out_features: int, bias: bool = True, activation: str | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"LinearFusion: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.dims, self.activation = list(dims), activation
        stock = nn.Linear(sum(self.dims), out_features, bias=bias)
        self.weight, self.bias = stock.weight, stock.bias

    @classmethod
    def from_module(cls, linear: nn.Linear, dims: Sequence[int], activation: str | None = None) -> "LinearFusion":
        """From the nn.Linear that a model applies to torch.cat(features, -1)."""
        if sum(dims) != linear.in_features:
            raise ValueError(f"LinearFusion.from_module: dims must add up to the linear's in_features {linear.in_features}, got {list(dims)}")
        layer = cls(dims, linear.out_features, linear.bias is not None, activation)
        layer.load_state_dict(linear.state_dict())
        return layer.to(linear.weight.device, linear.weight.dtype)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.dims):
            raise ValueError(f"LinearFusion: features must be {len(self.dims)} tensors of widths {self.dims}, got {len(features)}")
        return linear_fusion(list(features), list(self.weight.split(self.dims, dim=1)), self.bias, activation=self.activation)
