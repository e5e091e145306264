"""The public functional API: validation, then one torch.ops.mmkernels call."""
from mmkernels.ops.concat_weighted_fusion import concat_weighted_fusion
from mmkernels.ops.cross_attention import cross_attention

__all__ = ["cross_attention", "concat_weighted_fusion"]
