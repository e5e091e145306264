"""torch.autocast: the ops follow SDPA's policy (floating inputs but float64 in the autocast
dtype, mixed q/k/v dtypes settled by the cast), forward and backward, on every op."""
import pytest
import torch
import torch.nn.functional as F

import mmkernels
from test_func_transforms import OPS, make

AUTOCAST = torch.bfloat16  # the CPU's autocast dtype


def test_attention_matches_sdpa_under_autocast():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 16, generator=g) for n in (7, 11, 11))
    with torch.autocast("cpu", dtype=AUTOCAST):
        want = F.scaled_dot_product_attention(q, k, v)
        got = mmkernels.cross_attention(q, k, v)
    assert got.dtype == want.dtype == AUTOCAST
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_mixed_dtypes_are_cast_as_sdpa_casts_them():
    """A bf16 q with fp32 k and v: refused outside autocast (SDPA refuses them too), cast inside,
    and the gradients come back in each input's own dtype."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 5, 8, generator=g).to(torch.bfloat16).requires_grad_()
    k, v = (torch.randn(1, 2, 6, 8, generator=g).requires_grad_() for _ in range(2))
    with pytest.raises(mmkernels.InvalidInput, match="k must have q's dtype"):
        mmkernels.cross_attention(q, k, v)
    with torch.autocast("cpu", dtype=AUTOCAST):
        out = mmkernels.cross_attention(q, k, v)
        want = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and k.grad.dtype == v.grad.dtype == torch.float32


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.__name__)
def test_every_op_runs_in_the_autocast_dtype(op):
    f, inputs, _ = make(op)
    leaves = [t.float().requires_grad_() for t in inputs]
    with torch.autocast("cpu", dtype=AUTOCAST):
        out = f(*leaves)
    want = f(*(t.to(AUTOCAST) for t in inputs))
    assert out.dtype == AUTOCAST
    torch.testing.assert_close(out, want)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.__name__)
def test_mixed_dtypes_are_settled_on_every_op(op):
    """bf16 activations next to fp32 weights (every other input in bf16): refused outside
    autocast where the op needs one dtype, run in the autocast dtype inside it."""
    f, inputs, _ = make(op)
    mixed = [t.to(AUTOCAST) if i % 2 else t.float() for i, t in enumerate(inputs)]
    with torch.autocast("cpu", dtype=AUTOCAST):
        out = f(*mixed)
    assert out.dtype == AUTOCAST
    torch.testing.assert_close(out, f(*(t.to(AUTOCAST) for t in inputs)))


def test_float64_is_left_alone():
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=AUTOCAST):
        assert mmkernels.cross_attention(q, q, q).dtype == torch.float64
