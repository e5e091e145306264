"""torch.func over every op: grad, vjp and jacrev against the reference backend (plain torch ops,
which torch differentiates itself), and vmap against a loop of calls, with the vmapped dim
folded into the batch or rows (mmkernels/ops/batching.py) and, where a shared weight is batched,
one call per sample."""
import pytest
import torch
from torch.func import grad, jacrev, vjp, vmap

import mmkernels
from mmkernels.ops.batching import fold

N = 3  # the vmapped size


def randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def attention(g):
    q, k, v = randn(2, 4, 3, 8, g=g), randn(2, 2, 5, 8, g=g), randn(2, 2, 5, 8, g=g)
    lengths = torch.tensor([5, 2])
    return (lambda q, k, v, backend=None: mmkernels.cross_attention(q, k, v, kv_lengths=lengths, backend=backend)), [q, k, v], ()


def co_attention(g):
    def f(q_a, k_a, v_a, q_b, k_b, v_b, backend=None):
        a, b = mmkernels.co_attention(q_a, k_a, v_a, q_b, k_b, v_b, lengths_b=torch.tensor([4, 1]), backend=backend)
        return torch.cat([a.flatten(), b.flatten()])

    la, lb = [randn(2, 2, 3, 8, g=g) for _ in range(3)], [randn(2, 2, 4, 8, g=g) for _ in range(3)]
    return f, la + lb, ()


def concat_weighted_fusion(g):
    f = lambda a, b, w, bias, backend=None: mmkernels.concat_weighted_fusion([a, b], w, bias, backend=backend)
    return f, [randn(4, 6, g=g), randn(4, 6, g=g), randn(2, 12, g=g), randn(2, g=g)], (2, 3)


def decision_fusion(g):
    f = lambda a, b, w, backend=None: mmkernels.decision_fusion([a, b], w.softmax(0), backend=backend)
    return f, [randn(4, 5, g=g), randn(4, 5, g=g), randn(2, g=g)], (2,)


def linear_fusion(g):
    f = lambda a, b, wa, wb, bias, backend=None: mmkernels.linear_fusion([a, b], [wa, wb], bias, activation="gelu", backend=backend)
    return f, [randn(4, 3, g=g), randn(4, 5, g=g), randn(6, 3, g=g), randn(6, 5, g=g), randn(6, g=g)], (2, 3, 4)


def gated_fusion(g):
    f = lambda xa, xb, wa, wb, wz, backend=None: mmkernels.gated_fusion(xa, xb, wa, wb, wz, backend=backend)
    return f, [randn(4, 3, g=g), randn(4, 5, g=g), randn(6, 3, g=g), randn(6, 5, g=g), randn(6, 8, g=g)], (2, 3, 4)


def gated_residual_linear(g):
    f = lambda x, h, w, gate, backend=None: mmkernels.ops.gated_residual_linear(x, h, w, None, gate=gate, backend=backend)
    return f, [randn(4, 6, g=g), randn(4, 5, g=g), randn(6, 5, g=g), randn(1, g=g)], (2, 3)


OPS = [attention, co_attention, concat_weighted_fusion, decision_fusion, linear_fusion, gated_fusion, gated_residual_linear]


def make(op):
    return op(torch.Generator().manual_seed(0))


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.__name__)
def test_jacrev_matches_the_reference(op):
    f, inputs, _ = make(op)
    argnums = tuple(range(len(inputs)))
    got = jacrev(f, argnums=argnums)(*inputs)
    want = jacrev(lambda *a: f(*a, backend="reference"), argnums=argnums)(*inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.__name__)
def test_grad_and_vjp_match_autograd(op):
    f, inputs, _ = make(op)
    argnums = tuple(range(len(inputs)))
    leaves = [t.clone().requires_grad_() for t in inputs]
    want = torch.autograd.grad(f(*leaves).square().sum(), leaves)
    got = grad(lambda *a: f(*a).square().sum(), argnums=argnums)(*inputs)
    out, pullback = vjp(f, *inputs)
    for a, b, c in zip(got, want, pullback(2 * out)):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(c, b)


def stacked(inputs, g):
    return [t + randn(N, *t.shape, g=g) for t in inputs]


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.__name__)
def test_vmap_matches_a_loop(op):
    """Every per-row input batched (folded), then the first one alone (the rest expanded), then a
    shared weight batched too where the op has one (one call per sample)."""
    f, inputs, shared = make(op)
    g = torch.Generator().manual_seed(1)
    batched_sets = [[i for i in range(len(inputs)) if i not in shared], [0]] + ([[0, shared[0]]] if shared else [])
    for batched in batched_sets:
        args = [stacked([t], g)[0].movedim(0, 1) if i in batched else t for i, t in enumerate(inputs)]  # vmapped dim 1
        in_dims = tuple(1 if i in batched else None for i in range(len(inputs)))
        got = vmap(f, in_dims=in_dims)(*args)
        want = torch.stack([f(*(a[:, n] if i in batched else a for i, a in enumerate(args))) for n in range(N)])
        torch.testing.assert_close(got, want, msg=lambda m: f"batched inputs {batched}: {m}")


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.__name__)
def test_vmap_of_grad_matches_a_loop(op):
    """Per-sample gradients (vmap over grad), the backward batched as the forward is."""
    f, inputs, shared = make(op)
    args = stacked([inputs[0]], torch.Generator().manual_seed(2)) + inputs[1:]
    in_dims = (0,) + (None,) * (len(inputs) - 1)
    loss = lambda *a: f(*a).square().sum()
    got = vmap(grad(loss, argnums=tuple(range(len(inputs)))), in_dims=in_dims)(*args)
    for n in range(N):
        want = grad(loss, argnums=tuple(range(len(inputs))))(args[0][n], *inputs[1:])
        for a, b in zip(got, want):
            torch.testing.assert_close(a[n], b)


def test_vmap_folds_into_one_kernel_call(monkeypatch):
    """No per-sample loop where the dim folds: one call of the kernel for the whole vmap."""
    from mmkernels.ops import batching

    f, inputs, _ = make(attention)
    calls = []
    real = batching.fold
    monkeypatch.setattr(batching, "fold", lambda *a: calls.append(1) or real(*a))
    args = stacked(inputs, torch.Generator().manual_seed(3))
    with mmkernels.use_backend("cpu"):
        vmap(f)(*args)
    assert calls, "the batching rule did not run"
    per_sample = []
    monkeypatch.setattr(batching, "per_sample", lambda *a: per_sample.append(1))
    vmap(f)(*args)
    assert not per_sample


def test_fold_keeps_a_leading_vmapped_dim_a_view():
    x = torch.randn(N, 4, 6)
    assert fold(x, 0, N)._base is x or fold(x, 0, N).data_ptr() == x.data_ptr()


def test_vmap_of_a_dropout_backward_regenerates_each_samples_mask():
    """Per-sample cotangents through a dropout forward (vmap over vjp's pullback): each sample's
    backward must use the forward's mask, so dropout never folds samples into the batch."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 3, 8, generator=g) for _ in range(3))
    torch.manual_seed(5)
    _, pullback = vjp(lambda q: mmkernels.cross_attention(q, k, v, dropout_p=0.5), q)
    cotangents = torch.randn(N, *q.shape, generator=g)
    got = vmap(pullback, randomness="different")(cotangents)[0]
    for n in range(N):
        torch.testing.assert_close(got[n], pullback(cotangents[n])[0])


def test_vmap_over_no_samples():
    q, k = torch.randn(0, 1, 2, 3, 4), torch.randn(0, 1, 2, 5, 4)
    assert vmap(lambda q, k: mmkernels.cross_attention(q, k, k))(q, k).shape == (0, 1, 2, 3, 4)
