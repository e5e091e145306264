"""mmkernels: fused kernels for multimodal models, as torch operators with autograd.

    mmkernels.cross_attention(q, k, v, kv_lengths=..., ...)
    mmkernels.concat_weighted_fusion(features, weight, bias, values=..., output="sum")
"""
import torch  # noqa: F401  (libtorch must be loaded before the extension)

from mmkernels import _C  # noqa: F401  (loads the operator schemas and the C++ kernels)
from mmkernels.backends import BackendUnavailable, available_backends, use_backend
from mmkernels.info import info
from mmkernels.ops import co_attention, concat_weighted_fusion, cross_attention, decision_fusion, gated_fusion, linear_fusion
from mmkernels import nn  # noqa: E402
from mmkernels.patch import PatchReport, patch, unpatch

__version__ = _C.__version__

__all__ = [
    "BackendUnavailable",
    "available_backends",
    "co_attention",
    "concat_weighted_fusion",
    "cross_attention",
    "decision_fusion",
    "gated_fusion",
    "info",
    "linear_fusion",
    "nn",
    "patch",
    "PatchReport",
    "unpatch",
    "use_backend",
]
