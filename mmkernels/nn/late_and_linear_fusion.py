"""LinearFusion, GatedMultimodalUnit and DecisionFusion: thin layers over their ops."""
import torch
from torch import nn

from mmkernels.ops import decision_fusion, gated_fusion, linear_fusion
from mmkernels.ops.linear_fusion import ACTIVATIONS


class LinearFusion(nn.Module):
    """act(Linear(concat(features))) without building the concatenation.

    Parameters are those of the nn.Linear(sum(dims), out_features) it replaces (`weight`,
    `bias`), so that layer's state_dict loads unchanged; each modality uses a column slice of
    `weight` (a view, no copy)."""

    def __init__(self, dims, out_features, bias=True, activation=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"LinearFusion: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.dims, self.activation = list(dims), activation
        stock = nn.Linear(sum(self.dims), out_features, bias=bias)
        self.weight, self.bias = stock.weight, stock.bias

    @classmethod
    def from_module(cls, linear: nn.Linear, dims, activation=None) -> "LinearFusion":
        """From the nn.Linear that a model applies to torch.cat(features, -1)."""
        if sum(dims) != linear.in_features:
            raise ValueError(f"LinearFusion.from_module: dims must add up to the linear's in_features {linear.in_features}, got {list(dims)}")
        layer = cls(dims, linear.out_features, linear.bias is not None, activation)
        layer.load_state_dict(linear.state_dict())
        return layer.to(linear.weight.device, linear.weight.dtype)

    def forward(self, features):
        if len(features) != len(self.dims):
            raise ValueError(f"LinearFusion: features must be {len(self.dims)} tensors of widths {self.dims}, got {len(features)}")
        return linear_fusion(list(features), list(self.weight.split(self.dims, dim=1)), self.bias, activation=self.activation)


class DecisionFusion(nn.Module):
    """Late fusion of M per-modality predictions: sum_m w_m softmax(logits_m) (mode="prob") or
    sum_m w_m logits_m (mode="logit"), with w = softmax(weight_logits) learned (or fixed)."""

    def __init__(self, num_modalities, mode="prob", learnable=True):
        super().__init__()
        self.mode = mode
        logits = torch.zeros(num_modalities)
        self.weight_logits = nn.Parameter(logits) if learnable else nn.Buffer(logits)

    def forward(self, logits):
        return decision_fusion(list(logits), torch.softmax(self.weight_logits, 0), mode=self.mode)


class GatedMultimodalUnit(nn.Module):
    """The gated multimodal unit (Arevalo et al.): h = z * tanh(W_a x_a) + (1 - z) * tanh(W_b x_b),
    z = sigmoid(W_z [x_a; x_b]); parameters `proj_a`, `proj_b`, `gate` are nn.Linear layers."""

    def __init__(self, dim_a, dim_b, out_features, bias=True):
        super().__init__()
        self.proj_a = nn.Linear(dim_a, out_features, bias=bias)
        self.proj_b = nn.Linear(dim_b, out_features, bias=bias)
        self.gate = nn.Linear(dim_a + dim_b, out_features, bias=bias)

    def forward(self, x_a, x_b):
        return gated_fusion(x_a, x_b, self.proj_a.weight, self.proj_b.weight, self.gate.weight,
                            self.proj_a.bias, self.proj_b.bias, self.gate.bias)
