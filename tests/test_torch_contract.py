"""PyTorch's own tests of nn.MultiheadAttention and the Transformer layers, run against ours.

Vendored unchanged in tests/vendored/ (origin and changes in each file's header):
- torch_test_multihead_attention.py (test/nn/test_multihead_attention.py),
- torch_test_transformers.py (test/test_transformers.py, its TestTransformers class).
(test/test_modules.py is not here: the only copy we could vendor predates torch 2.14's module_db,
and stock fails every one of its MultiheadAttention and Transformer cases.)
Each test class runs three times here:
- stock: as PyTorch runs it, so that a torch upgrade that changes the contract shows up here;
- swapped: nn.MultiheadAttention (every name torch and the files bind it to) is our class, so
  the Transformer layers build ours (the "class" mode);
- patched: the stock layer is built, then converted as mmkernels.patch() converts it.
"""
import re
import unittest.mock

import torch
from torch import nn

from mmkernels.nn import CrossModalAttention
from vendored import torch_test_multihead_attention, torch_test_transformers

VENDORED = (torch_test_multihead_attention, torch_test_transformers)

STOCK = nn.MultiheadAttention

# Tests that cannot apply to a layer other than torch's own, and why (regex over the test name).
INAPPLICABLE = {
    r"test_multihead_self_attn_two_masks_fast_path_mock":
        "mocks torch._native_multi_head_attention and asserts stock's own fast path called it",
    r"test_disable_fastpath":
        "mocks torch._transformer_encoder_layer_fwd / _native_multi_head_attention and asserts stock's own fast "
        "path was or was not called",
    r"test_transformerencoderlayer_subclass(_model)?_":
        "compares the eager layer with its TorchScript twin in training mode, attention dropout on, under one "
        "seed: a scripted layer runs stock's math on our weights, whose dropout draws are not the kernel's "
        "Philox mask (the eval half is test_scripted_subclass_matches_eager below)",
}

# Tests of behaviour newer than the torch installed here: stock fails them too.
NEEDS_NEWER_TORCH = {
    "test_multihead_attn_nested_tensor_outside_fast_path": ((2, 15), "jagged NestedTensor input outside the fast path"),
}

# Tests the vendored copy (older than torch 2.14.1) has that stock itself fails on this torch.
STOCK_FAILS_HERE = {
    r"test_multiheadattention_fastpath_attn_mask_.*_bool_":
        "random bool masks hide whole rows; torch 2.14's slow path gives NaN there, its fast path 0",
    r"test_scaled_dot_product_attention_[34]D_input_dim":
        "an SDPA-only test (no MultiheadAttention) whose fully-masked rows are NaN in torch 2.14's SDPA",
}


class PatchedMultiheadAttention:
    """nn.MultiheadAttention as mmkernels.patch() leaves it: built stock, then converted."""

    def __new__(cls, *args, **kwargs):
        return CrossModalAttention.from_module(STOCK(*args, **kwargs))


class _Mode:
    make = None  # what nn.MultiheadAttention(...) builds in this mode; None: stock

    def setUp(self):
        super().setUp()
        name = self._testMethodName
        for test, why in INAPPLICABLE.items():
            if self.make is not None and re.match(test, name):
                self.skipTest(f"inapplicable: {why}")
        for test, why in STOCK_FAILS_HERE.items():
            if re.match(test, name):
                self.skipTest(f"stock fails it on torch {torch.__version__}: {why}")
        for test, (version, why) in NEEDS_NEWER_TORCH.items():
            if name.startswith(test) and torch.__version__ < ".".join(map(str, version)):
                self.skipTest(f"needs torch >= {version}: {why}")
        if self.make is not None:
            owners = (nn, nn.modules.activation, nn.modules.transformer, *VENDORED)
            patchers = [unittest.mock.patch.object(owner, "MultiheadAttention", self.make)
                        for owner in owners if hasattr(owner, "MultiheadAttention")]
            for patcher in patchers:
                patcher.start()
                self.addCleanup(patcher.stop)


def _modes(base, stem):
    for mode, make in (("Stock", None), ("Swapped", CrossModalAttention), ("Patched", PatchedMultiheadAttention)):
        name = f"Test{mode}{stem}"
        attrs = {"make": staticmethod(make) if make else None, "__module__": __name__}
        globals()[name] = type(name, (_Mode, base), attrs)


for device in ("", "CPU", "CUDA"):  # instantiate_device_type_tests made one class per device
    for module, base, stem in (
        (torch_test_multihead_attention, "TestMultiheadAttentionNN", "MHA"),
        (torch_test_multihead_attention, "TestMultiheadAttentionNNDeviceType", "MHADevice"),
        (torch_test_transformers, "TestTransformers", "Transformers"),
    ):
        if hasattr(module, base + device) and (device or base == "TestMultiheadAttentionNN"):
            _modes(getattr(module, base + device), stem + device)


def test_scripted_subclass_matches_eager():
    """test_transformerencoderlayer_subclass's eval half, and its training half without dropout,
    in both of our modes: a scripted subclass of the encoder layer over our attention gives the
    eager numbers."""

    class MyCustomLayer(nn.TransformerEncoderLayer):
        pass

    for make in (CrossModalAttention, PatchedMultiheadAttention):
        with unittest.mock.patch.object(nn.modules.transformer, "MultiheadAttention", make):
            torch.manual_seed(0)
            layer = MyCustomLayer(d_model=8, nhead=4, dim_feedforward=32, dropout=0.0, batch_first=True)
        assert isinstance(layer.self_attn, CrossModalAttention)
        src, mask = torch.rand(2, 4, 8), torch.zeros(4, 4, dtype=torch.bool)
        for training in (True, False):
            layer.train(training)
            scripted = torch.jit.script(layer)
            with torch.no_grad():
                torch.testing.assert_close(layer(src, src_mask=mask), scripted(src, src_mask=mask))
