"""cross_attention on every backend that runs here, against the float64 reference."""
import pytest
import torch

import mmkernels
from attention_cases import EDGE_CASES, SEED, Case, composite, reference_fp64
from tolerance import assert_close

# "triton" runs here through TRITON_INTERPRET=1 (set in conftest.py).
BACKENDS = ["cpu", "reference", "triton"]


def run_and_grads(fn, q, k, v, grad, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    torch.manual_seed(SEED)  # the same dropout draw on every path
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    return out, grads


def check_backend(backend, case, dtype, device="cpu"):
    q, k, v, kw = case.make(dtype, device)
    grad = torch.randn(q.shape, dtype=dtype, device=device)
    out, grads = run_and_grads(lambda *a, **k_: mmkernels.cross_attention(*a, backend=backend, **k_), q, k, v, grad, **kw)
    ref, ref_grads = run_and_grads(reference_fp64, q, k, v, grad.double(), **kw)
    comp, comp_grads = run_and_grads(composite, q, k, v, grad, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close("out", out, comp, ref, dtype)
    for name, g, c, r in zip("qkv", grads, comp_grads, ref_grads):
        assert_close(f"grad_{name}", g, c, r, dtype)
    return out, grads, kw


@pytest.mark.parametrize("case", EDGE_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_fp32(backend, case):
    check_backend(backend, case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [Case(kv_lengths=True, q_lengths=True, layout="blhd"), Case(Hq=4, Hkv=1, D=128, key_padding_mask=True, empty_row=True)], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_half_precision(backend, case, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 is broken in triton 3.8's interpreter; the triton backend's bf16 is tested on a GPU")
    check_backend(backend, case, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_semantics(backend):
    """Padded query rows and rows with no visible key are exactly 0 and get no gradient; padded
    keys get no gradient."""
    case = Case(B=3, kv_lengths=True, q_lengths=True, empty_row=True)
    out, (dq, dk, dv), kw = check_backend(backend, case, torch.float32)
    for b in range(case.B):
        ql, kl = int(kw["q_lengths"][b]), int(kw["kv_lengths"][b])
        assert (out[b, :, ql:] == 0).all() and (dq[b, :, ql:] == 0).all()
        assert (dk[b, :, kl:] == 0).all() and (dv[b, :, kl:] == 0).all()
        if kl == 0:
            assert (out[b] == 0).all() and (dq[b] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_keeps_q_layout(backend):
    """A (B, L, H, D) view comes back as one: out.transpose(1, 2) is contiguous, no copy needed."""
    q, k, v, _ = Case(layout="blhd").make(torch.float32)
    out = mmkernels.cross_attention(q, k, v, backend=backend)
    assert out.transpose(1, 2).is_contiguous()


def test_matches_sdpa_with_equivalent_mask():
    q, k, v, kw = Case(Hq=4, Hkv=4, key_padding_mask=True).make(torch.float32)
    mask = ~kw["key_padding_mask"].view(q.shape[0], 1, 1, -1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(mmkernels.cross_attention(q, k, v, **kw), expected)


def test_explicit_scale():
    q, k, v, _ = Case().make(torch.float32)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(mmkernels.cross_attention(q, k, v, scale=0.3), expected)


@pytest.mark.parametrize("backend", ["cpu", "reference"])  # triton has no float64
def test_gradcheck_float64(backend):
    q, k, v, kw = Case(B=2, Hq=2, Hkv=1, Lq=5, Lk=7, D=8, kv_lengths=True, key_padding_mask=True, q_lengths=True).make(torch.float64)
    kw["kv_lengths"] = torch.tensor([7, 3])
    kw["q_lengths"] = torch.tensor([5, 2])
    inputs = tuple(t.detach().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: mmkernels.cross_attention(q, k, v, backend=backend, **kw), inputs)


def kernel_dropout_mask(backend, B, H, Lq, Lk, p, seed):
    """The keep mask a backend's kernel really applies, read off its output: with q = 0 every
    visible key gets probability 1/Lk, and with v the identity, out[..., j] = keep_j / (Lk (1 - p))."""
    q = torch.zeros(B, H, Lq, Lk)
    k = torch.randn(B, H, Lk, Lk)
    v = torch.eye(Lk).expand(B, H, Lk, Lk)
    torch.manual_seed(seed)
    out = mmkernels.cross_attention(q, k, v, dropout_p=p, backend=backend)
    scaled = out * Lk * (1 - p)
    assert torch.allclose(scaled, scaled.round(), atol=1e-4)  # every entry is kept (1) or dropped (0)
    return scaled.round().bool()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_debug_entry_is_the_kernels_mask(backend):
    B, H, Lq, Lk, p = 2, 3, 19, 48, 0.3
    torch.manual_seed(5)
    expected = mmkernels.attention_dropout_mask(torch.empty(B, H, Lq, 8), torch.empty(B, H, Lk, 8), p)
    assert torch.equal(kernel_dropout_mask(backend, B, H, Lq, Lk, p, seed=5), expected)


def test_dropout_keep_rate_and_independence():
    p, n = 0.2, 4 * 256 * 512
    torch.manual_seed(0)
    keep = mmkernels.attention_dropout_mask(torch.empty(1, 4, 256, 8), torch.empty(1, 4, 512, 8), p)
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    for a, b in ((keep[0, 0], keep[0, 1]), (keep[0, 0, :128], keep[0, 0, 128:]), (keep[0, 0, :, ::2], keep[0, 0, :, 1::2])):
        agree = (a == b).float().mean().item()  # independent draws agree with probability p^2 + (1-p)^2
        assert abs(agree - (p * p + (1 - p) ** 2)) < 0.01
    torch.manual_seed(0)
    assert torch.equal(keep, mmkernels.attention_dropout_mask(torch.empty(1, 4, 256, 8), torch.empty(1, 4, 512, 8), p))
    assert not torch.equal(keep, mmkernels.attention_dropout_mask(torch.empty(1, 4, 256, 8), torch.empty(1, 4, 512, 8), p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_same_seed_bitwise_equal(backend):
    q, k, v, kw = Case(Lq=33, Lk=70, dropout=0.3, causal=True, kv_lengths=True).make(torch.float32, "cpu")
    grad = torch.randn_like(q)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = mmkernels.cross_attention(qq, kk, vv, backend=backend, **kw)
        runs.append((out, *torch.autograd.grad(out, (qq, kk, vv), grad)))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0], runs[2][0])


# flash-attn's README, written out: with causal=True and Lq != Lk the mask is aligned to the
# bottom-right corner, and a row whose mask is all zero outputs zero. (1 = key kept.)
FLASH_ATTN_CAUSAL = {
    (2, 5): [[1, 1, 1, 1, 0],
             [1, 1, 1, 1, 1]],
    (5, 2): [[0, 0],
             [0, 0],
             [0, 0],
             [1, 0],
             [1, 1]],
}


def attention_by_rows(q, k, v, keep):
    """Each query row alone, in float64: softmax over the keys its row of `keep` kept, or zero."""
    scale = q.shape[-1] ** -0.5
    rows = []
    for i in range(q.shape[-2]):
        kept = torch.tensor(keep[i], dtype=torch.bool)
        if not kept.any():
            rows.append(torch.zeros_like(q[..., i, :]))
            continue
        p = torch.softmax((q[..., i : i + 1, :] @ k[..., kept, :].transpose(-1, -2)) * scale, dim=-1)
        rows.append((p @ v[..., kept, :])[..., 0, :])
    return torch.stack(rows, dim=-2)


@pytest.mark.parametrize("shape", sorted(FLASH_ATTN_CAUSAL), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_with_unequal_lengths_is_flash_attn_bottom_right(backend, shape):
    Lq, Lk = shape
    g = torch.Generator().manual_seed(SEED)
    q, k, v = (torch.randn(2, 3, L, 16, generator=g, dtype=torch.float64) for L in (Lq, Lk, Lk))
    grad = torch.randn(2, 3, Lq, 16, generator=g, dtype=torch.float64)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    out = mmkernels.cross_attention(*leaves, causal=True, backend=backend)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention_by_rows(*ref_leaves, FLASH_ATTN_CAUSAL[shape])
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    for a, r in zip(torch.autograd.grad(out, leaves, grad.float()), torch.autograd.grad(ref, ref_leaves, grad)):
        torch.testing.assert_close(a.double(), r, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_with_unequal_lengths_on_bigger_shapes(backend):
    """The same rule, spelled as flash-attn's docstring does (row i keeps key j when
    j <= i + Lk - Lq), over lengths that cross tile edges both ways."""
    g = torch.Generator().manual_seed(SEED)
    for Lq, Lk in ((37, 70), (70, 37), (1, 33), (33, 1)):
        q, k, v = (torch.randn(1, 2, L, 16, generator=g, dtype=torch.float64) for L in (Lq, Lk, Lk))
        keep = [[int(j <= i + Lk - Lq) for j in range(Lk)] for i in range(Lq)]
        out = mmkernels.cross_attention(q.float(), k.float(), v.float(), causal=True, backend=backend)
        torch.testing.assert_close(out.double(), attention_by_rows(q, k, v, keep), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8, 8, 1, 64, 64), (2, 32, 8, 1, 300, 128), (1, 4, 1, 3, 1000, 40),
                                   (3, 6, 2, 4, 257, 16), (1, 1, 1, 1, 5000, 64)], ids=str)
def test_decoding_rows_match_the_reference(shape, dtype):
    """Lq <= 4 runs the CPU's decode kernel (query heads of a GQA group stacked as rows; the keys
    split over threads and merged when the heads cannot fill them, as the last two shapes do):
    every visibility rule, against the composite."""
    B, Hq, Hkv, Lq, Lk, D = shape
    g = torch.Generator().manual_seed(SEED)
    q, k, v = (torch.randn(B, h, n, D, generator=g, dtype=dtype) for h, n in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    start = torch.randint(0, Lk, (B, Lq), generator=g)
    rules = [{}, dict(kv_lengths=torch.randint(0, Lk + 1, (B,), generator=g)),
             dict(q_lengths=torch.randint(0, Lq + 1, (B,), generator=g), kv_start=start,
                  kv_end=start + torch.randint(0, Lk, (B, Lq), generator=g)),
             dict(key_padding_mask=torch.rand(B, Lk, generator=g) < 0.3), dict(causal=True)]
    for rule in rules:
        got = mmkernels.cross_attention(q, k, v, backend="cpu", **rule)
        want = mmkernels.cross_attention(q, k, v, backend="reference", **rule)
        torch.testing.assert_close(got.double(), want.double(), atol={torch.bfloat16: 2e-2}.get(dtype, 1e-5), rtol=0)


# Decoding steps on triton: a program per (query index, kv head), the group's query heads as its
# rows. With the interpreter's 16-key tiles, every case but the last splits its keys over programs
# (flash-decoding, merged after); the last has too few key tiles to split and finishes in place.
TRITON_DECODING = [Case(B=2, Hq=8, Hkv=2, Lq=1, Lk=300, kv_lengths=True), Case(B=1, Hq=4, Hkv=4, Lq=3, Lk=100, D=40,
                   key_padding_mask=True, q_lengths=True), Case(Lq=4, Lk=77, D=24, ranges=True, dropout=0.3),
                   Case(Hq=6, Hkv=2, Lq=2, Lk=50, causal=True, empty_row=True, layout="blhd"),
                   Case(B=3, Hq=4, Hkv=1, Lq=1, Lk=61, D=16, key_padding_mask=True, kv_lengths=True, dropout=0.2),
                   Case(B=1, Hq=40, Hkv=2, Lq=2, Lk=90, D=16, kv_lengths=True, dropout=0.1),  # groups of 20: 16 + 4 rows
                   Case(B=2, Hq=8, Hkv=2, Lq=1, Lk=40, D=16, kv_lengths=True)]


@pytest.mark.parametrize("case", TRITON_DECODING, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_decoding_steps_and_their_backward(case, dtype, monkeypatch):
    from mmkernels.backends.triton import decoding

    programs = case.B * case.Hkv * -(-(case.Hq // case.Hkv) // decoding.ROWS) * case.Lq
    splits = decoding.split_keys(torch.device("cpu"), programs, case.Lk, decoding.tiles(dtype, 64)[0])[0]
    assert (splits > 1) == (case is not TRITON_DECODING[-1])
    calls = []
    monkeypatch.setattr(decoding, "decode", lambda *a, real=decoding.decode: calls.append(1) or real(*a))
    check_backend("triton", case, dtype)
    assert calls, "the decoding path did not run"


@pytest.mark.parametrize("backend, dtype", [("cpu", torch.float64), ("triton", torch.float32)])
def test_decoding_hides_non_finite_hidden_keys_and_keeps_the_backward_exact(backend, dtype):
    """A decoding step's hidden keys hold NaN and Inf: nothing of them reaches the output; and its
    statistics feed the general backward (a sharp softmax needs the forward's scores bit for bit)."""
    g = torch.Generator().manual_seed(SEED)
    q = torch.randn(2, 8, 1, 32, generator=g, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 2, 200, 32, generator=g, dtype=dtype) for _ in range(2))
    lengths = torch.tensor([150, 7])
    k[:, :, 150:], v[:, :, 150:] = float("nan"), float("inf")
    tol = dict(atol=1e-9, rtol=1e-7) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
    for scale in (None, 30.0, 1e30):
        got = mmkernels.cross_attention(q, k, v, kv_lengths=lengths, scale=scale, backend=backend)
        want = mmkernels.cross_attention(q, k, v, kv_lengths=lengths, scale=scale, backend="reference")
        torch.testing.assert_close(got, want, **tol)
        (dq,) = torch.autograd.grad(got.sum(), q)
        (dq_ref,) = torch.autograd.grad(want.sum(), q)
        torch.testing.assert_close(dq, dq_ref, atol=tol["atol"] * (scale or 1), rtol=tol["rtol"])


@pytest.mark.parametrize("transform", ["grad", "vjp"])
def test_torch_func_transforms(transform):
    """torch.func.grad and vjp over the op give autograd's gradients."""
    g = torch.Generator().manual_seed(SEED)
    q, k, v = (torch.randn(2, 4, n, 16, generator=g, dtype=torch.float64) for n in (5, 9, 9))
    lengths = torch.tensor([9, 4])
    f = lambda q, k, v: mmkernels.cross_attention(q, k, v, kv_lengths=lengths).sum()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(f(*leaves), leaves)
    if transform == "grad":
        got = torch.func.grad(f, argnums=(0, 1, 2))(q, k, v)
    else:
        _, pullback = torch.func.vjp(f, q, k, v)
        got = pullback(torch.tensor(1.0, dtype=torch.float64))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
