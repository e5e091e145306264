"""varlen_attention against flash-attn's definitions, written out here per sequence: its test
suite's attention_ref rules (bottom-right causal, a (left, right) window with a negative side
unbounded, rows that see no key output 0), on every backend that runs here."""
import pytest
import torch

import mmkernels
from tolerance import assert_close

BACKENDS = ["cpu", "reference", "triton"]


def flash_rules_attention(q, k, v, causal=False, window_size=(-1, -1), softmax_scale=None):
    """One sequence, flash-attn's way: q (Lq, Hq, D), k/v (Lk, Hkv, D), in q's dtype."""
    Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[0], k.shape[1]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    left, right = window_size
    if causal:
        right = 0
    row = torch.arange(Lq, device=q.device).view(-1, 1)
    col = torch.arange(Lk, device=q.device).view(1, -1)
    diagonal = row + Lk - Lq
    hidden = torch.zeros(Lq, Lk, dtype=torch.bool, device=q.device)
    if right >= 0:
        hidden |= col > diagonal + right
    if left >= 0:
        hidden |= col < diagonal - left
    probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), -1)
    probs = probs.masked_fill(hidden.all(-1, keepdim=True), 0.0)  # no visible key: 0, not NaN
    return torch.einsum("hqk,khd->qhd", probs, v)


def flash_rules_varlen(q, k, v, cu_q, cu_k, **kw):
    out = torch.zeros_like(q)
    for s in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        if qe > qs:
            out[qs:qe] = flash_rules_attention(q[qs:qe], k[ks:ke], v[ks:ke], **kw)
    return out


def packed(q_lens, k_lens, Hq=4, Hkv=2, D=16, extra_q=0, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]) + extra_q, Hq, D, generator=g).to(device, dtype)
    k = torch.randn(int(cu_k[-1]), Hkv, D, generator=g).to(device, dtype)
    v = torch.randn(int(cu_k[-1]), Hkv, D, generator=g).to(device, dtype)
    return q, k, v, cu_q.to(device), cu_k.to(device), max(q_lens), max(k_lens)


def outputs_and_grads(fn, q, k, v, grad):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return out, torch.autograd.grad(out, (q, k, v), grad)


SEQUENCES = [
    ([3, 0, 17, 5], [4, 6, 0, 33]),  # an empty query sequence, an empty key sequence
    ([40, 9], [9, 40]),  # Lq > Lk: causal rows above the diagonal see nothing
    ([1, 1, 1], [70, 3, 129]),  # decoding rows
]
MASKS = [dict(), dict(causal=True), dict(window_size=(3, 1)), dict(causal=True, window_size=(2, 5)),
         dict(window_size=(-1, 2)), dict(window_size=(4, -1))]


@pytest.mark.parametrize("mask", MASKS, ids=str)
@pytest.mark.parametrize("lens", SEQUENCES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_flash_attn_rules(backend, lens, mask):
    q, k, v, cu_q, cu_k, mq, mk = packed(*lens, extra_q=2)
    grad = torch.randn_like(q)
    out, grads = outputs_and_grads(
        lambda q, k, v: mmkernels.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, backend=backend, **mask), q, k, v, grad)
    ref, ref_grads = outputs_and_grads(lambda q, k, v: flash_rules_varlen(q, k, v, cu_q, cu_k, **mask),
                                       q.double(), k.double(), v.double(), grad.double())
    comp, comp_grads = outputs_and_grads(lambda q, k, v: flash_rules_varlen(q, k, v, cu_q, cu_k, **mask), q, k, v, grad)
    assert out.shape == q.shape and out.is_contiguous()
    assert_close("out", out, comp, ref, torch.float32)
    for name, g, c, r in zip("qkv", grads, comp_grads, ref_grads):
        assert_close(f"grad_{name}", g, c, r, torch.float32)
    tail = int(cu_q[-1])
    assert (out[tail:] == 0).all() and (grads[0][tail:] == 0).all()  # rows past cu_seqlens_q[-1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(dtype, backend="cpu", device="cpu"):
    """(tests/test_gpu.py runs this on the GPU backends.)"""
    q, k, v, cu_q, cu_k, mq, mk = packed([5, 33, 0, 70], [47, 12, 9, 70], Hq=8, Hkv=1, D=64, dtype=dtype, device=device)
    grad = torch.randn_like(q)
    kw = dict(causal=True, window_size=(16, -1), softmax_scale=0.2)
    out, grads = outputs_and_grads(lambda q, k, v: mmkernels.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, backend=backend, **kw),
                                   q, k, v, grad)
    ref, ref_grads = outputs_and_grads(lambda q, k, v: flash_rules_varlen(q, k, v, cu_q, cu_k, **kw),
                                       q.double(), k.double(), v.double(), grad.double())
    comp, comp_grads = outputs_and_grads(lambda q, k, v: flash_rules_varlen(q, k, v, cu_q, cu_k, **kw), q, k, v, grad)
    assert out.dtype == dtype
    assert_close("out", out, comp, ref, dtype)
    for name, g, c, r in zip("qkv", grads, comp_grads, ref_grads):
        assert_close(f"grad_{name}", g, c, r, dtype)


def test_packed_inputs_are_not_copied():
    """(total, H, D) is read in place: a strided view such as a slice of a packed qkv projection works."""
    q, k, v, cu_q, cu_k, mq, mk = packed([6, 10], [6, 10], Hq=2, Hkv=2)
    qkv = torch.stack([q, k, v], 1)  # (total, 3, H, D), as a fused projection lays it out
    out = mmkernels.varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_q, cu_k, mq, mk, causal=True)
    torch.testing.assert_close(out, flash_rules_varlen(q, k, v, cu_q, cu_k, causal=True))


def test_dropout_is_the_same_draw_on_every_backend():
    q, k, v, cu_q, cu_k, mq, mk = packed([7, 20], [30, 4])
    outs = []
    for backend in ("cpu", "reference"):
        torch.manual_seed(3)
        outs.append(mmkernels.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, dropout_p=0.3, backend=backend))
    torch.testing.assert_close(*outs)
    assert not torch.allclose(outs[0], flash_rules_varlen(q, k, v, cu_q, cu_k))


def test_compiles_without_graph_breaks():
    q, k, v, cu_q, cu_k, mq, mk = packed([4, 9], [8, 9])
    fn = torch.compile(lambda q, k, v: mmkernels.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=True), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), flash_rules_varlen(q, k, v, cu_q, cu_k, causal=True))


@pytest.mark.parametrize("change, message", [
    (dict(cu_seqlens_q=torch.tensor([0.0, 3.0])), "cu_seqlens_q must be a 1-D int32 or int64 tensor"),
    (dict(cu_seqlens_k=torch.tensor([0, 7])), "the same number of sequences"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 2], dtype=torch.int32)), r"cu_seqlens_q must be non-decreasing offsets in \[0, 5\]"),
    (dict(cu_seqlens_k=torch.tensor([0, 2, 9], dtype=torch.int32)), r"cu_seqlens_k must be non-decreasing offsets in \[0, 7\]"),
    (dict(q=torch.randn(1, 5, 2, 8)), r"q must be 3-D \(total, H, D\)"),
    (dict(max_seqlen_q=-1), "max_seqlen_q must be a non-negative int"),
    (dict(window_size=(1,)), "window_size a pair of ints"),
])
def test_errors_name_the_argument(change, message):
    args = dict(q=torch.randn(5, 2, 8), k=torch.randn(7, 2, 8), v=torch.randn(7, 2, 8),
                cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 3, 7], dtype=torch.int32),
                max_seqlen_q=3, max_seqlen_k=4)
    args.update(change)
    with pytest.raises(mmkernels.InvalidInput, match=message):
        mmkernels.varlen_attention(**args)


@pytest.mark.parametrize("mask, same_as", [(dict(window_size=(-1, 2**31 - 1)), dict()),
                                           (dict(causal=True, window_size=(2**32, -1)), dict(causal=True))])
def test_windows_wider_than_any_sequence_are_unbounded(mask, same_as):
    """Window sides past the int32 range: no wrap-around in the index math."""
    q, k, v, cu_q, cu_k, mq, mk = packed([5, 9], [7, 3])
    torch.testing.assert_close(mmkernels.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, **mask),
                               flash_rules_varlen(q, k, v, cu_q, cu_k, **same_as))


def test_max_seqlen_as_transformers_passes_it():
    """A one-element tensor (transformers' max_length_q), or a NumPy-like integer."""
    q, k, v, cu_q, cu_k, mq, mk = packed([4, 6], [4, 6])
    out = mmkernels.varlen_attention(q, k, v, cu_q, cu_k, torch.tensor(mq), torch.tensor([mk]))
    torch.testing.assert_close(out, flash_rules_varlen(q, k, v, cu_q, cu_k))
