"""Drop-in layers: parameters, then one call into mmkernels.ops. One layer family per file."""
from mmkernels.nn.co_attention import CoAttention
from mmkernels.nn.concat_weighted_fusion import ConcatWeightedFusion
from mmkernels.nn.cross_modal_attention import CrossModalAttention
from mmkernels.nn.decision_fusion import DecisionFusion
from mmkernels.nn.gated_cross_attention import GatedCrossAttention
from mmkernels.nn.gated_fusion import GatedMultimodalUnit
from mmkernels.nn.linear_fusion import LinearFusion

__all__ = ["CoAttention", "ConcatWeightedFusion", "CrossModalAttention", "DecisionFusion", "GatedCrossAttention", "GatedMultimodalUnit", "LinearFusion"]
