"""Small ready models built from mmkernels layers."""
from mmkernels.models.multimodal_classifier import MultimodalClassifier

__all__ = ["MultimodalClassifier"]
