"""co_attention: both directions, the numbers of two cross_attention calls; one launch on triton."""
import pytest
import torch

import mmkernels


def modalities(B=2, Ha=4, Hb=4, La=13, Lb=37, D=32, kv_heads=None):
    torch.manual_seed(0)
    kv = kv_heads or (Ha, Hb)
    a = [torch.randn(B, Ha, La, D)] + [torch.randn(B, kv[0], La, D) for _ in range(2)]
    b = [torch.randn(B, Hb, Lb, D)] + [torch.randn(B, kv[1], Lb, D) for _ in range(2)]
    return a, b


def two_calls(a, b, lengths_a, lengths_b, backend):
    out_a = mmkernels.cross_attention(a[0], b[1], b[2], kv_lengths=lengths_b, q_lengths=lengths_a, backend=backend)
    out_b = mmkernels.cross_attention(b[0], a[1], a[2], kv_lengths=lengths_a, q_lengths=lengths_b, backend=backend)
    return out_a, out_b


@pytest.mark.parametrize("lengths", ["none", "a", "both"])
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_matches_two_cross_attention_calls(backend, lengths):
    a, b = modalities(kv_heads=(2, 1))  # GQA on both sides
    lengths_a = torch.tensor([13, 5]) if lengths != "none" else None
    lengths_b = torch.tensor([1, 37]) if lengths == "both" else None
    leaves = [t.clone().requires_grad_() for t in (*a, *b)]
    out = mmkernels.co_attention(*leaves, lengths_a=lengths_a, lengths_b=lengths_b, backend=backend)
    ref_leaves = [t.double().requires_grad_() for t in (*a, *b)]
    ref = two_calls(ref_leaves[:3], ref_leaves[3:], lengths_a, lengths_b, "reference")
    g = [torch.randn_like(o) for o in out]
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r.float(), atol=2e-5, rtol=1e-4)
    grads = torch.autograd.grad(out, leaves, g)
    ref_grads = torch.autograd.grad(ref, ref_leaves, [x.double() for x in g])
    for x, r in zip(grads, ref_grads):
        torch.testing.assert_close(x, r.float(), atol=2e-5, rtol=1e-4)


def test_triton_runs_both_directions_in_one_launch(monkeypatch):
    from mmkernels.backends.triton import co_attention, cross_attention

    launched = []
    for module, name in ((cross_attention, "_fwd_kernel"), (co_attention, "_fwd_co_kernel")):
        kernel = getattr(module, name)

        class Spy:
            def __init__(self, k, n):
                self.k, self.n = k, n

            def __getitem__(self, grid):
                launched.append(self.n)
                return self.k[grid]

        monkeypatch.setattr(module, name, Spy(kernel, name))
    a, b = modalities()
    mmkernels.co_attention(*a, *b, backend="triton")
    assert launched == ["_fwd_co_kernel"]


def test_layer_and_errors():
    layer = mmkernels.nn.CoAttention(24, 16, num_heads=4, dim=32)
    x_a, x_b = torch.randn(2, 5, 24), torch.randn(2, 9, 16)
    y_a, y_b = layer(x_a, x_b, lengths_b=torch.tensor([9, 3]))
    assert y_a.shape == x_a.shape and y_b.shape == x_b.shape
    (y_a.sum() + y_b.sum()).backward()
    a, b = modalities()
    with pytest.raises(ValueError, match=r"lengths_b must have shape \(2,\), got \(3,\)"):
        mmkernels.co_attention(*a, *b, lengths_b=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"k_b must be \(B=2, Hkv, Lk, D=32\) to match q_a, got \(2, 4, 37, 16\)"):
        mmkernels.co_attention(*a, *[t[..., :16] for t in b])
    with pytest.raises(ValueError, match="q_b must have q_a's head dim 32, got 16"):  # each direction consistent
        mmkernels.co_attention(a[0], a[1][..., :16], a[2][..., :16], b[0][..., :16], b[1], b[2])
    with pytest.raises(ValueError, match=r"lengths_a must be in \[0, 13\], got values in \[1, 14\]"):
        mmkernels.co_attention(*a, *b, lengths_a=torch.tensor([14, 1]))


def test_opcheck():
    a, b = modalities(B=1, La=5, Lb=7, D=16)
    args = [t.requires_grad_() for t in (*a, *b)] + [torch.tensor([3]), None, torch.tensor([[0, 1, 2, 3, 4]]), None, None,
                                                       torch.tensor([[7, 6, 5, 4, 3, 2, 1]]), 0.25]
    for backend in ("cpu", "triton"):
        torch.library.opcheck(torch.ops.mmkernels.co_attention.default, args + [backend])
