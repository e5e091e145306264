"""Every op, forward and backward, with a zero-sized dimension: zeros (or empties) of the right
shape and no error, as the plain composite gives (SDPA's backward of an empty batch works)."""
import pytest
import torch

import mmkernels
from mmkernels.ops.gated_residual_linear import gated_residual_linear

BACKENDS = ["cpu", "reference", "triton"]


def _leaves(*shapes):
    return [torch.randn(*s, requires_grad=True) for s in shapes]


def _grads(out, leaves):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    loss = sum((o.float() * torch.randn_like(o.float())).sum() for o in outs)
    if not loss.requires_grad:  # nothing reaches the leaves: their gradients are absent, as stock
        return [None] * len(leaves)
    return torch.autograd.grad(loss, leaves, allow_unused=True)


ATTENTION_SHAPES = {  # (B, Hq, Hkv, Lq, Lk, D)
    "B=0": (0, 4, 2, 5, 7, 16), "Hq=0": (2, 0, 0, 5, 7, 16), "Lq=0": (2, 4, 2, 0, 7, 16), "Lk=0": (2, 4, 2, 5, 0, 16),
    "D=0": (2, 4, 2, 5, 7, 0),
}


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attention_of_empty_tensors(backend, shape):
    B, Hq, Hkv, Lq, Lk, D = ATTENTION_SHAPES[shape]
    leaves = _leaves((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D))
    if backend == "triton" and D == 0:  # its head dims start at 1: it says so, and auto takes another
        with pytest.raises(mmkernels.BackendUnavailable, match="head dims 1 to"):
            mmkernels.cross_attention(*leaves, scale=0.25, backend=backend)
        backend = None
    out = mmkernels.cross_attention(*leaves, scale=0.25, backend=backend)
    assert out.shape == (B, Hq, Lq, D) and (out == 0).all()
    for g, t in zip(_grads(out, leaves), leaves):
        assert g.shape == t.shape and (g == 0).all()
    expected = torch.nn.functional.scaled_dot_product_attention(*(t.detach() for t in leaves), scale=0.25, enable_gqa=True) \
        if Lk else torch.zeros(B, Hq, Lq, D)
    torch.testing.assert_close(out.detach(), expected)


@pytest.mark.parametrize("which", ["La=0", "Lb=0", "B=0"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_co_attention_of_empty_tensors(backend, which):
    B, La, Lb = {"La=0": (2, 0, 6), "Lb=0": (2, 5, 0), "B=0": (0, 5, 6)}[which]
    leaves = _leaves(*[(B, 2, La, 16)] * 3, *[(B, 2, Lb, 16)] * 3)
    out_a, out_b = mmkernels.co_attention(*leaves, backend=backend)
    assert out_a.shape == (B, 2, La, 16) and out_b.shape == (B, 2, Lb, 16)
    for g, t in zip(_grads((out_a, out_b), leaves), leaves):
        assert g.shape == t.shape and (g == 0).all()


@pytest.mark.parametrize("rows", [0, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fusion_ops_of_empty_tensors(backend, rows):
    """No rows at all, or rows of width 0 where a width may be 0."""
    feats = _leaves((rows, 4), (rows, 6)) if rows == 0 else _leaves((rows, 0), (rows, 0))
    weight = torch.randn(2, sum(f.shape[1] for f in feats), requires_grad=True)
    out = mmkernels.concat_weighted_fusion(feats, weight, output="concat", backend=backend)
    assert out.shape == (rows, sum(f.shape[1] for f in feats))
    for g, t in zip(_grads(out, feats + [weight]), feats + [weight]):
        assert g is None or (g.shape == t.shape and (g == 0).all())
    logits = _leaves((rows, 0), (rows, 0)) if rows else _leaves((0, 5), (0, 5))
    out = mmkernels.decision_fusion(logits, backend=backend)
    assert out.shape == logits[0].shape
    for g, t in zip(_grads(out, logits), logits):
        assert g is None or g.shape == t.shape
    ws = _leaves((8, 4), (8, 6))
    out = mmkernels.linear_fusion(_leaves((0, 4), (0, 6)), ws, activation="gelu", backend=backend)
    assert out.shape == (0, 8)
    for g in _grads(out, ws):
        assert g is None or (g == 0).all()
    x, h = _leaves((0, 8), (0, 12))
    w = torch.randn(8, 12, requires_grad=True)
    out = gated_residual_linear(x, h, w, gate=torch.tensor([0.5], requires_grad=True), backend=backend)
    assert out.shape == (0, 8)
    _grads(out, [x, h, w])
    xa, xb = _leaves((0, 4), (0, 6))
    out = mmkernels.gated_fusion(xa, xb, torch.randn(8, 4), torch.randn(8, 6), torch.randn(8, 10), backend=backend)
    assert out.shape == (0, 8)
    _grads(out, [xa, xb])
