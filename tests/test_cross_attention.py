"""cross_attention on every backend that runs here, against the float64 reference."""
import pytest
import torch

import mmkernels
from attention_cases import EDGE_CASES, Case, composite, reference_fp64
from tolerance import assert_close

CPU_BACKENDS = ["cpu", "reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_and_grads(fn, q, k, v, grad, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
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
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_reference_fp32(backend, case):
    check_backend(backend, case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [Case(kv_lengths=True, q_lengths=True, layout="blhd"), Case(Hq=4, Hkv=1, D=128, key_padding_mask=True, empty_row=True)], ids=str)
def test_cpu_half_precision(case, dtype):
    check_backend("cpu", case, dtype)


def test_padding_semantics():
    """Padded query rows and rows with no visible key are exactly 0 and get no gradient; padded
    keys get no gradient."""
    case = Case(B=3, kv_lengths=True, q_lengths=True, empty_row=True)
    out, (dq, dk, dv), kw = check_backend("cpu", case, torch.float32)
    for b in range(case.B):
        ql, kl = int(kw["q_lengths"][b]), int(kw["kv_lengths"][b])
        assert (out[b, :, ql:] == 0).all() and (dq[b, :, ql:] == 0).all()
        assert (dk[b, :, kl:] == 0).all() and (dv[b, :, kl:] == 0).all()
        if kl == 0:
            assert (out[b] == 0).all() and (dq[b] == 0).all()


def test_output_keeps_q_layout():
    """A (B, L, H, D) view comes back as one: out.transpose(1, 2) is contiguous, no copy needed."""
    q, k, v, _ = Case(layout="blhd").make(torch.float32)
    out = mmkernels.cross_attention(q, k, v, backend="cpu")
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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    q, k, v, kw = Case(B=2, Hq=2, Hkv=1, Lq=5, Lk=7, D=8, kv_lengths=True, key_padding_mask=True, q_lengths=True).make(torch.float64)
    kw["kv_lengths"] = torch.tensor([7, 3])
    kw["q_lengths"] = torch.tensor([5, 2])
    inputs = tuple(t.detach().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: mmkernels.cross_attention(q, k, v, backend=backend, **kw), inputs)
