"""PyTorch's own nn.MultiheadAttention tests, run against CrossModalAttention.

The tests are vendored unchanged in tests/vendored/torch_test_multihead_attention.py. Each of
its test classes runs three times here:
- stock: as PyTorch runs it, so that a torch upgrade that changes the contract shows up here;
- swapped: nn.MultiheadAttention (every name torch and the file bind it to) is our class;
- patched: the stock layer is built, then converted as mmkernels.patch() converts it.
"""
import unittest.mock

import torch
from torch import nn

from mmkernels.nn import CrossModalAttention
from vendored import torch_test_multihead_attention as vendored

STOCK = nn.MultiheadAttention

# Tests that cannot apply to a layer other than torch's own, and why.
INAPPLICABLE = {
    "test_multihead_self_attn_two_masks_fast_path_mock":
        "mocks torch._native_multi_head_attention and asserts stock's own fast path called it",
}

# Tests of behaviour newer than the torch installed here: stock fails them too.
NEEDS_NEWER_TORCH = {
    "test_multihead_attn_nested_tensor_outside_fast_path": ((2, 15), "jagged NestedTensor input outside the fast path"),
}


def patched(*args, **kwargs):
    return CrossModalAttention.from_module(STOCK(*args, **kwargs))


class _Mode:
    make = None  # what nn.MultiheadAttention(...) builds in this mode; None: stock

    def setUp(self):
        super().setUp()
        name = self._testMethodName
        for test, why in INAPPLICABLE.items():
            if self.make is not None and name.startswith(test):
                self.skipTest(f"inapplicable: {why}")
        for test, (version, why) in NEEDS_NEWER_TORCH.items():
            if name.startswith(test) and torch.__version__ < ".".join(map(str, version)):
                self.skipTest(f"needs torch >= {version}: {why}")
        if self.make is not None:
            for owner in (nn, nn.modules.activation, nn.modules.transformer, vendored):
                patcher = unittest.mock.patch.object(owner, "MultiheadAttention", self.make)
                patcher.start()
                self.addCleanup(patcher.stop)


def _modes(base, stem):
    for mode, make in (("Stock", None), ("Swapped", CrossModalAttention), ("Patched", patched)):
        name = f"Test{mode}{stem}"
        globals()[name] = type(name, (_Mode, base), {"make": staticmethod(make) if make else None, "__module__": __name__})


_modes(vendored.TestMultiheadAttentionNN, "MHA")
for device in ("CPU", "CUDA"):  # instantiate_device_type_tests made one class per device here
    if hasattr(vendored, f"TestMultiheadAttentionNNDeviceType{device}"):
        _modes(getattr(vendored, f"TestMultiheadAttentionNNDeviceType{device}"), f"MHADevice{device}")
