"""Drop-in layers: parameters, then one call into mmkernels.ops."""
from mmkernels.nn.co_attention import CoAttention
from mmkernels.nn.concat_weighted_fusion import ConcatWeightedFusion
from mmkernels.nn.cross_modal_attention import CrossModalAttention
from mmkernels.nn.gated_cross_attention import GatedCrossAttention
from mmkernels.nn.late_and_linear_fusion import DecisionFusion, GatedMultimodalUnit, LinearFusion

__all__ = ["CoAttention", "ConcatWeightedFusion", "CrossModalAttention", "DecisionFusion", "GatedCrossAttention", "GatedMultimodalUnit", "LinearFusion"]
