"""The triton backend's four kernels."""
from mmkernels.backends.triton.attention import cross_attention, cross_attention_backward  # noqa: F401
from mmkernels.backends.triton.fusion import concat_weighted_fusion, concat_weighted_fusion_backward  # noqa: F401
