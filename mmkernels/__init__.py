"""mmkernels: fused kernels for multimodal models, as torch operators with autograd.

    mmkernels.cross_attention(q, k, v, kv_lengths=..., ...)
    mmkernels.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True)
    mmkernels.concat_weighted_fusion(features, weight, bias, values=..., output="sum")
"""
import os
import warnings

with warnings.catch_warnings():
    # torch warns at import when NumPy is missing; mmkernels never uses NumPy, so that is noise here.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch  # noqa: F401  (libtorch must be loaded before the extension)


def _load_extension():
    """mmkernels._C, or an ImportError that says what to do: the extension is built by pip (or
    `make build`), and must be built against the torch that runs it."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        from mmkernels import _C
    except ImportError as e:
        checkout = os.path.exists(os.path.join(os.path.dirname(here), "setup.py"))
        hint = (f"You are importing the source checkout at {os.path.dirname(here)}, where it is not built: run "
                "`pip install --no-build-isolation -e .` there (or `make build`), or run from another directory "
                "to use an installed mmkernels." if checkout else
                "Reinstall it: `pip install --no-build-isolation mmkernels` against the torch you run.")
        why = "they are not built" if checkout else f"{e}"
        raise ImportError(f"mmkernels' compiled kernels (mmkernels._C) could not be loaded: {why}. {hint}") from None
    built, running = _C.torch_version.split(".")[:2], torch.__version__.split("+")[0].split(".")[:2]
    if built != running:
        raise ImportError(f"mmkernels was built against torch {_C.torch_version} but torch {torch.__version__} is "
                          "running; its kernels use torch's C++ ABI, which changes between minor versions. Rebuild it: "
                          "`pip install --no-build-isolation --force-reinstall --no-deps mmkernels` (or `make build`).")
    return _C


_C = _load_extension()  # loads the operator schemas and the C++ kernels
from mmkernels.backends import BackendUnavailable, available_backends, use_backend
from mmkernels.info import info
from mmkernels.ops import attention_dropout_mask, co_attention, concat_weighted_fusion, cross_attention, decision_fusion, gated_fusion, linear_fusion, varlen_attention
from mmkernels.ops.checks import InvalidInput
from mmkernels import nn  # noqa: E402
from mmkernels.patch import PatchReport, patch, unpatch

__version__ = _C.__version__


def __getattr__(name):
    # mmkernels.profile(model, inputs), imported on first use: the profiler stays out of `import mmkernels`.
    if name == "profile":
        from mmkernels.profiling import profile

        return profile
    raise AttributeError(f"module 'mmkernels' has no attribute {name!r}")

__all__ = [
    "attention_dropout_mask",
    "BackendUnavailable",
    "available_backends",
    "co_attention",
    "concat_weighted_fusion",
    "cross_attention",
    "decision_fusion",
    "gated_fusion",
    "info",
    "InvalidInput",
    "linear_fusion",
    "nn",
    "patch",
    "PatchReport",
    "profile",
    "unpatch",
    "use_backend",
    "varlen_attention",
]
