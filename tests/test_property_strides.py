"""Every argument of every op in every layout a caller can hand over: contiguous, transposed,
sliced, stride 0 (expanded). Hypothesis draws the layout of each argument independently; each
backend must give the reference's numbers (`pytest --slow` runs many more examples)."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmkernels

settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("MMKERNELS_HYPOTHESIS_PROFILE", "ci"))

LAYOUTS = ["contiguous", "transposed", "sliced", "expanded", "wide"]
ROW_LAYOUTS = ["contiguous", "sliced", "expanded", "wide"]  # rows keep a contiguous last dim, by design


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as t, in another layout (the last dim stays contiguous where the op needs
    it: "transposed" stores the leading dims in reverse order)."""
    if layout == "transposed" and t.dim() >= 2:
        dims = list(range(t.dim()))
        if t.dim() == 2 and t.shape[1] > 1:  # a (rows, cols) matrix, read column-major
            return t.t().contiguous().t()
        lead = dims[:-1][::-1] + [dims[-1]]
        return t.permute(*lead).contiguous().permute(*[lead.index(d) for d in dims])
    if layout == "sliced":  # every other element of a bigger tensor along the first dim, an offset start
        big = torch.zeros((2 * t.shape[0] + 1, *t.shape[1:]) if t.dim() else (3,), dtype=t.dtype)
        view = big[1::2] if t.dim() else big[1]
        view.copy_(t)
        return view
    if layout == "wide" and t.dim() >= 2:  # rows inside a wider buffer: a row stride > the row's width
        big = torch.zeros(*t.shape[:-1], t.shape[-1] + 5, dtype=t.dtype)
        view = big[..., 2 : 2 + t.shape[-1]]
        view.copy_(t)
        return view
    if layout == "expanded" and t.dim() >= 1 and t.shape[0] > 0:
        # stride 0 along the first dim: only possible for equal rows, so broadcast row 0
        return t[:1].expand_as(t)
    return t.clone()


ROWS = ("features", "logits", "x_a", "x_b", "x", "h")


def with_layouts(draw, named):
    def one(name, t):
        return laid_out(t, draw(st.sampled_from(ROW_LAYOUTS if name in ROWS else LAYOUTS)))

    return {n: ([one(n, t) for t in v] if isinstance(v, list) else one(n, v) if isinstance(v, torch.Tensor) else v)
            for n, v in named.items()}


@st.composite
def attention_args(draw):
    B, Hkv = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    Hq, Lq, Lk = Hkv * draw(st.integers(1, 2)), draw(st.integers(1, 20)), draw(st.integers(1, 40))
    D = draw(st.sampled_from([8, 16, 24]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    args = dict(q=torch.randn(B, Hq, Lq, D, generator=g), k=torch.randn(B, Hkv, Lk, D, generator=g),
                v=torch.randn(B, Hkv, Lk, D, generator=g))
    if draw(st.booleans()):
        args["kv_lengths"] = torch.randint(0, Lk + 1, (B,), generator=g)
    if draw(st.booleans()):
        args["q_lengths"] = torch.randint(0, Lq + 1, (B,), generator=g).int()
    if draw(st.booleans()):
        args["key_padding_mask"] = torch.rand(B, Lk, generator=g) < 0.3
    if draw(st.booleans()):
        args["kv_start"] = torch.randint(-2, Lk, (B, Lq), generator=g)
        args["kv_end"] = torch.randint(0, Lk + 3, (B, Lq), generator=g).int()
    args["causal"] = draw(st.booleans())
    return with_layouts(draw, args)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@given(args=attention_args())
def test_attention_arguments_in_any_layout(backend, args):
    q, k, v = (args.pop(n) for n in "qkv")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # detach keeps the layout; clone would not
    assert [l.stride() for l in leaves] == [t.stride() for t in (q, k, v)]
    out = mmkernels.cross_attention(*leaves, backend=backend, **args)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = mmkernels.cross_attention(*ref_leaves, backend="reference", **args)
    torch.testing.assert_close(out, ref.float(), atol=3e-5, rtol=1e-4)
    grad = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, ref_leaves, grad.double())):
        torch.testing.assert_close(a, r.float(), atol=3e-5, rtol=1e-4)


@st.composite
def co_attention_args(draw):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    La, Lb, D = draw(st.integers(1, 20)), draw(st.integers(1, 20)), draw(st.sampled_from([8, 16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    args = {n: torch.randn(B, H, La if n.endswith("a") else Lb, D, generator=g) for n in ("q_a", "k_a", "v_a", "q_b", "k_b", "v_b")}
    if draw(st.booleans()):
        args["lengths_a"] = torch.randint(0, La + 1, (B,), generator=g)
        args["lengths_b"] = torch.randint(0, Lb + 1, (B,), generator=g).int()
    if draw(st.booleans()):
        args["kv_start_a"] = torch.randint(-1, Lb, (B, La), generator=g)
        args["kv_end_a"] = torch.randint(0, Lb + 2, (B, La), generator=g)
    return with_layouts(draw, args)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@given(args=co_attention_args())
def test_co_attention_arguments_in_any_layout(backend, args):
    names = ("q_a", "k_a", "v_a", "q_b", "k_b", "v_b")
    tensors = [args.pop(n) for n in names]
    leaves = [t.detach().requires_grad_() for t in tensors]
    outs = mmkernels.co_attention(*leaves, backend=backend, **args)
    ref_leaves = [t.detach().double().requires_grad_() for t in tensors]
    refs = mmkernels.co_attention(*ref_leaves, backend="reference", **args)
    grads = [torch.randn_like(o) for o in outs]
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r.float(), atol=3e-5, rtol=1e-4)
    got = torch.autograd.grad(outs, leaves, grads)
    want = torch.autograd.grad(refs, ref_leaves, [g.double() for g in grads])
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r.float(), atol=3e-5, rtol=1e-4)


@st.composite
def fusion_args(draw):
    M, rows = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    widths = [draw(st.integers(1, 12)) for _ in range(M)]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    r = lambda *s: torch.randn(*s, generator=g)
    op = draw(st.sampled_from(["concat_weighted_fusion", "linear_fusion", "gated_fusion", "gated_residual_linear", "decision_fusion"]))
    N = draw(st.integers(1, 10))
    if op == "concat_weighted_fusion":
        args = dict(features=[r(rows, w) for w in widths], weight=r(M, sum(widths)) / 3, bias=r(M) if draw(st.booleans()) else None)
    elif op == "linear_fusion":
        args = dict(features=[r(rows, w) for w in widths], weights=[r(N, w) for w in widths], bias=r(N) if draw(st.booleans()) else None)
    elif op == "gated_fusion":
        Da, Db = widths[0], draw(st.integers(1, 12))
        args = dict(x_a=r(rows, Da), x_b=r(rows, Db), weight_a=r(N, Da), weight_b=r(N, Db), weight_z=r(N, Da + Db),
                    bias_a=r(N), bias_b=None, bias_z=r(N))
    elif op == "gated_residual_linear":
        args = dict(x=r(rows, N), h=r(rows, widths[0]), weight=r(N, widths[0]), bias=r(N), gate=r(1),
                    row_mask=torch.rand(rows, generator=g) if draw(st.booleans()) else None)
    else:
        C = widths[0]
        args = dict(logits=[r(rows, C) for _ in range(M)], weights=torch.rand(M, generator=g) + 0.1)

    return op, with_layouts(draw, args)


def call(op, args, backend):
    fn = mmkernels.ops.gated_residual_linear if op == "gated_residual_linear" else getattr(mmkernels, op)
    if op == "concat_weighted_fusion" and len({f.shape[-1] for f in args["features"]}) > 1:
        return fn(**args, output="concat", backend=backend)
    return fn(**args, backend=backend)


def leaves_of(args):
    return [t for v in args.values() for t in (v if isinstance(v, list) else [v]) if isinstance(t, torch.Tensor) and t.is_floating_point()]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@given(case=fusion_args())
def test_fusion_family_arguments_in_any_layout(backend, case):
    op, args = case
    d_args = {k: ([t.detach().double().requires_grad_() for t in v] if isinstance(v, list)
                  else v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    f_args = {k: ([t.detach().requires_grad_() for t in v] if isinstance(v, list)
                  else v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    out = call(op, f_args, backend)
    ref = call(op, d_args, "reference")
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=1e-4)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves_of(f_args), grad, allow_unused=True)
    want = torch.autograd.grad(ref, leaves_of(d_args), grad.double(), allow_unused=True)
    for a, r in zip(got, want):
        if r is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, r.float(), atol=5e-5, rtol=1e-4)
