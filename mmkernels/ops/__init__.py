"""The public functional API: validation, then one torch.ops.mmkernels call."""
from mmkernels.ops.co_attention import co_attention
from mmkernels.ops.concat_weighted_fusion import concat_weighted_fusion
from mmkernels.ops.cross_attention import attention_dropout_mask, cross_attention
from mmkernels.ops.decision_fusion import decision_fusion
from mmkernels.ops.gated_fusion import gated_fusion
from mmkernels.ops.gated_residual_linear import gated_residual_linear
from mmkernels.ops.linear_fusion import linear_fusion
from mmkernels.ops.varlen_attention import varlen_attention
from mmkernels.ops import sharding

sharding.register_if_distributed()  # DTensor already in use: the ops' strategies now, before any call

__all__ = ["attention_dropout_mask", "co_attention", "cross_attention", "concat_weighted_fusion", "decision_fusion", "gated_fusion", "gated_residual_linear", "linear_fusion", "varlen_attention"]
