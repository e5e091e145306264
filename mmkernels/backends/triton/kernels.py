"""The triton backend's kernels, by op name."""
from mmkernels.backends.triton.attention import (  # noqa: F401
    co_attention,
    co_attention_backward,
    cross_attention,
    cross_attention_backward,
)
from mmkernels.backends.triton.decision import decision_fusion, decision_fusion_backward  # noqa: F401
from mmkernels.backends.triton.fusion import concat_weighted_fusion, concat_weighted_fusion_backward  # noqa: F401
from mmkernels.backends.triton.epilogue import gated_residual_linear, gated_residual_linear_backward  # noqa: F401
from mmkernels.backends.triton.linear import linear_fusion, linear_fusion_backward  # noqa: F401
from mmkernels.backends.triton.gated import gated_fusion, gated_fusion_backward  # noqa: F401
