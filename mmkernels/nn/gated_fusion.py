"""GatedMultimodalUnit: the gated multimodal unit over two modalities."""
from torch import Tensor, nn

from mmkernels.ops import gated_fusion


class GatedMultimodalUnit(nn.Module):
    """The gated multimodal unit (Arevalo et al.): h = z * tanh(W_a x_a) + (1 - z) * tanh(W_b x_b),
    z = sigmoid(W_z [x_a; x_b]); parameters `proj_a`, `proj_b`, `gate` are nn.Linear layers."""

    def __init__(self, dim_a: int, dim_b: int, out_features: int, bias: bool = True):
        super().__init__()
        self.proj_a = nn.Linear(dim_a, out_features, bias=bias)
        self.proj_b = nn.Linear(dim_b, out_features, bias=bias)
        self.gate = nn.Linear(dim_a + dim_b, out_features, bias=bias)

    def forward(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        return gated_fusion(x_a, x_b, self.proj_a.weight, self.proj_b.weight, self.gate.weight,
                            self.proj_a.bias, self.proj_b.bias, self.gate.bias)
