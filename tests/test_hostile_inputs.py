"""Hostile and careless inputs, round two: each defect the campaign found, pinned by the
reproducer that found it. Either the right numbers or a clear error; never a corrupted input,
a crash, a silent zero or a silent wrong gradient."""
import math
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch

import mmkernels
from attention_cases import Case, composite
from mmkernels.ops.checks import InvalidInput
from tolerance import assert_close

ATTENTION_BACKENDS = ["cpu", "reference", "triton"]


# --- 1. an op must never write into its inputs -----------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_linear_fusion_of_one_row_leaves_the_bias_alone(backend):
    b = torch.randn(4)
    b0 = b.clone()
    out = mmkernels.linear_fusion([torch.randn(1, 3)], [torch.randn(4, 3)], b, backend=backend)
    assert torch.equal(b, b0), "the caller's bias changed"
    out += 1
    assert torch.equal(b, b0), "the output aliases the bias"


def test_linear_fusion_layer_bias_stays_put_over_batches_of_one():
    layer = mmkernels.nn.LinearFusion([3, 5], 4)
    bias = layer.bias.detach().clone()
    for _ in range(3):
        layer([torch.randn(1, 3), torch.randn(1, 5)])
    assert torch.equal(layer.bias.detach(), bias)


# --- 2. raw operators validate what they index ------------------------------------------------

# Each probe calls a raw operator with one malformed argument. They run in a child process that
# announces each probe first, so that a crash names its probe.
PROBES = r'''
import sys, torch, mmkernels
ops = torch.ops.mmkernels
f = lambda *s: torch.randn(*s)
i = lambda *v: torch.tensor(v)
q, k, v = f(2, 4, 5, 8), f(2, 2, 7, 8), f(2, 2, 7, 8)
vis = lambda **kw: [kw.get("kvl"), kw.get("kpm"), kw.get("ql"), kw.get("start"), kw.get("end"), False, 0.0, None, 0.125]
out, lse = ops.native_cross_attention(q, k, v, *vis())
probes = {
    "empty feature list": lambda: ops.native_concat_weighted_fusion([], f(2, 0), None, [], False),
    "fewer weights than features": lambda: ops.native_linear_fusion([f(3, 4), f(3, 5)], [f(2, 4)], None, 0),
    "small fusion weight": lambda: ops.native_concat_weighted_fusion([f(3, 4), f(3, 4)], f(2, 3), None, [], False),
    "fusion rows differ": lambda: ops.native_concat_weighted_fusion([f(3, 4), f(2, 4)], f(2, 8), None, [], False),
    "fusion short gate": lambda: ops.native_concat_weighted_fusion_backward(f(3, 4), [f(3, 4), f(3, 4)], f(2, 8), [], f(2, 2), False),
    "Hkv = 0": lambda: ops.native_cross_attention(q, f(2, 0, 7, 8), f(2, 0, 7, 8), *vis()),
    "Hkv > Hq": lambda: ops.native_cross_attention(f(2, 2, 5, 8), f(2, 4, 7, 8), f(2, 4, 7, 8), *vis()),
    "short kv_lengths": lambda: ops.native_cross_attention(q, k, v, *vis(kvl=i(3))),
    "short q_lengths": lambda: ops.native_cross_attention(q, k, v, *vis(ql=i(3))),
    "short mask": lambda: ops.native_cross_attention(q, k, v, *vis(kpm=torch.zeros(2, 3, dtype=torch.bool))),
    "short kv_start": lambda: ops.native_cross_attention(q, k, v, *vis(start=torch.zeros(2, 2, dtype=torch.long))),
    "float kv_end": lambda: ops.native_cross_attention(q, k, v, *vis(end=f(2, 5))),
    "wrong k shape": lambda: ops.native_cross_attention(q, f(2, 2, 7, 4), v, *vis()),
    "v shape differs from k": lambda: ops.native_cross_attention(q, k, f(2, 2, 6, 8), *vis()),
    "3-D q": lambda: ops.native_cross_attention(f(4, 5, 8), k, v, *vis()),
    "short lse": lambda: ops.native_cross_attention_backward(f(2, 4, 5, 8), q, k, v, out, lse[:, :, :2], *vis()),
    "short grad_out": lambda: ops.native_cross_attention_backward(f(2, 4, 2, 8), q, k, v, out, lse, *vis()),
    "dropout without a seed": lambda: ops.native_cross_attention(q, k, v, None, None, None, None, None, False, 0.5, None, 0.1),
    "router: short kv_lengths on triton": lambda: ops.cross_attention(q, k, v, *vis(kvl=i(3)), "triton"),
    "router: short kv_lengths on reference": lambda: ops.cross_attention(q, k, v, *vis(kvl=i(3)), "reference"),
    "router: short weight on triton": lambda: ops.concat_weighted_fusion([f(3, 4), f(3, 4)], f(2, 3), None, [], False, "triton"),
    "router: decision logits differ": lambda: ops.decision_fusion([f(3, 4), f(3, 5)], torch.ones(2) / 2, True, "cpu"),
    "decision weights short": lambda: ops.native_decision_fusion([f(3, 4), f(3, 4)], torch.ones(1), True),
    "gated fusion small weight": lambda: ops.native_gated_fusion(f(3, 4), f(3, 5), f(6, 4), f(6, 5), f(6, 8), None, None, None),
    "gated residual small weight": lambda: ops.native_gated_residual_linear(f(3, 6), f(3, 4), f(6, 3), None, f(1), None),
    "gated residual short row mask": lambda: ops.native_gated_residual_linear(f(3, 6), f(3, 4), f(6, 4), None, f(1), f(2)),
    "linear activation index": lambda: ops.native_linear_fusion([f(3, 4)], [f(2, 4)], None, 9),
    "cpu q with meta lengths": lambda: ops.cross_attention(q, k, v, *vis(kvl=torch.tensor([3, 3], device="meta")), "cpu"),
}
for name, call in probes.items():
    print("PROBE", name, flush=True)
    try:
        call()
    except RuntimeError as e:  # mmkernels' InvalidInput is one too
        print("RAISED", name, "|", str(e).splitlines()[0][:160], flush=True)
        continue
    print("NO ERROR", name, flush=True)
    sys.exit(3)
print("ALL RAISED", flush=True)
'''


def test_raw_operators_raise_on_malformed_input_never_crash():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", PROBES], capture_output=True, text=True, env=env, timeout=600)
    lines = proc.stdout.splitlines()
    last = next((ln for ln in reversed(lines) if ln.startswith("PROBE")), "")
    assert proc.returncode >= 0, f"the process died of signal {-proc.returncode} in {last!r}:\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0 and lines[-1] == "ALL RAISED", f"{last!r} did not raise:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    for ln in lines:  # every message names what was wrong, not a raw indexing failure
        if ln.startswith("RAISED"):
            assert "must" in ln or "expected" in ln, ln


# --- 3. triton takes any strides ------------------------------------------------------------------


def test_triton_lengths_with_strides_and_stride_zero():
    q, k, v, _ = Case(B=3, Lq=9, Lk=40).make(torch.float32)
    lens2d = torch.tensor([[40, 7], [3, 9], [25, 1]])
    for lengths in (lens2d[:, 0], torch.tensor([11]).expand(3)):  # a strided view, a stride-0 view
        got = mmkernels.cross_attention(q, k, v, kv_lengths=lengths, q_lengths=lengths.clamp(max=9), backend="triton")
        want = mmkernels.cross_attention(q, k, v, kv_lengths=lengths.contiguous(), q_lengths=lengths.clamp(max=9).contiguous(),
                                         backend="reference")
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_fusion_ops_take_transposed_weights_and_strided_biases(backend):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    f = [r(5, 4), r(5, 6)]
    w_t = r(10, 2).t()  # (2, 10), column stride 2
    b = r(4)[::2]  # stride 2
    torch.testing.assert_close(mmkernels.concat_weighted_fusion(f, w_t, b, output="concat", backend=backend),
                               mmkernels.concat_weighted_fusion(f, w_t.contiguous(), b.contiguous(), output="concat", backend="reference"))
    ws = [r(4, 3).t(), r(6, 3).t()]  # (3, 4), (3, 6)
    lb = r(6)[::2]
    torch.testing.assert_close(mmkernels.linear_fusion(f, ws, lb, activation="gelu", backend=backend),
                               mmkernels.linear_fusion(f, [w.contiguous() for w in ws], lb.contiguous(), activation="gelu", backend="reference"),
                               atol=1e-5, rtol=1e-4)
    wa, wb, wz = r(4, 3).t(), r(6, 3).t(), r(10, 3).t()
    torch.testing.assert_close(mmkernels.gated_fusion(*f, wa, wb, wz, lb, None, lb, backend=backend),
                               mmkernels.gated_fusion(*f, wa.contiguous(), wb.contiguous(), wz.contiguous(), lb.contiguous(), None,
                                                      lb.contiguous(), backend="reference"), atol=1e-5, rtol=1e-4)
    x, h, w = r(5, 3), r(5, 4), r(4, 3).t()
    mask = r(10)[::2]
    torch.testing.assert_close(mmkernels.ops.gated_residual_linear(x, h, w, lb, gate=torch.tensor([0.3]), row_mask=mask, backend=backend),
                               mmkernels.ops.gated_residual_linear(x, h, w.contiguous(), lb.contiguous(), gate=torch.tensor([0.3]),
                                                                   row_mask=mask.contiguous(), backend="reference"), atol=1e-5, rtol=1e-4)


# --- 4. hidden keys never influence anything --------------------------------------------------


def poisoned(kind, poison):
    """q, k, v and the arguments that hide some keys, with those keys holding `poison`; the
    expected output from clean keys."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 6, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    hidden = torch.zeros(2, 6, 40, dtype=torch.bool)  # (B, Lq, Lk): which key each row does not see
    if kind == "kv_lengths":
        kw = dict(kv_lengths=torch.tensor([40, 13]))
        hidden[1, :, 13:] = True
    elif kind == "key_padding_mask":
        mask = torch.zeros(2, 40, dtype=torch.bool)
        mask[0, 5:9] = mask[1, 20:] = True
        kw = dict(key_padding_mask=mask)
        hidden |= mask[:, None, :]
    elif kind == "key_padding_mask+kv_lengths":  # each hides keys the other leaves
        mask = torch.zeros(2, 40, dtype=torch.bool)
        mask[0, 5:9] = mask[0, 30:33] = mask[1, 2] = True
        kw = dict(key_padding_mask=mask, kv_lengths=torch.tensor([31, 17]))
        hidden |= mask[:, None, :]
        hidden[0, :, 31:] = hidden[1, :, 17:] = True
    elif kind == "ranges":
        start, end = torch.tensor([[0, 0, 0, 20, 20, 20]] * 2), torch.tensor([[10, 10, 10, 30, 30, 30]] * 2)
        kw = dict(kv_start=start, kv_end=end)
        j = torch.arange(40)
        hidden = (j < start[..., None]) | (j >= end[..., None])
    else:  # causal
        kw = dict(causal=True)
        hidden |= torch.ones(6, 40, dtype=torch.bool).triu(40 - 6 + 1)
    keys_nobody_sees = hidden.all(1)  # (B, Lk)
    return q, k, v, kw, keys_nobody_sees, poison


# 3e38 is finite, but its scores overflow to inf: a hidden key must not reach a row through them.
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 3e38], ids=["nan", "inf", "huge"])
@pytest.mark.parametrize("kind", ["kv_lengths", "key_padding_mask", "key_padding_mask+kv_lengths", "ranges", "causal"])
@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_hidden_keys_never_influence_anything(backend, kind, poison):
    q, k, v, kw, nobody, value = poisoned(kind, poison)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    clean = mmkernels.cross_attention(*leaves, backend="reference", **kw)
    clean_grads = torch.autograd.grad(clean.sum(), leaves)
    k2, v2 = k.clone(), v.clone()
    for b in range(2):
        k2[b, :, nobody[b]] = value
        v2[b, :, nobody[b]] = value
    leaves = [t.clone().requires_grad_() for t in (q, k2, v2)]
    out = mmkernels.cross_attention(*leaves, backend=backend, **kw)
    grads = torch.autograd.grad(out.sum(), leaves)
    torch.testing.assert_close(out, clean, atol=2e-5, rtol=1e-4)
    for g, c in zip(grads, clean_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, c, atol=2e-5, rtol=1e-4)
    for b in range(2):
        assert (grads[1][b, :, nobody[b]] == 0).all() and (grads[2][b, :, nobody[b]] == 0).all()


def partly_hidden(kind, D=16):
    """q, k, v and arguments under which some keys are hidden from some rows and seen by others
    (the causal diagonal; the first image of two); those keys (B, Lk) and the rows that see none of
    them (B, Lq). Bottom-right causal hides no key from every row: the last row sees them all."""
    torch.manual_seed(0)
    B, Lq, Lk = 2, 6, 40
    q, k, v = torch.randn(B, 2, Lq, D), torch.randn(B, 2, Lk, D), torch.randn(B, 2, Lk, D)
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)
    if kind == "causal":
        kw = dict(causal=True)
        visible = (j <= i + Lk - Lq).expand(B, Lq, Lk)
        poisoned_keys = torch.zeros(B, Lk, dtype=torch.bool)
        poisoned_keys[:, Lk - 2:] = True  # seen by the last row (and one by the row before), by no other
    else:  # ranges: rows 0-2 see keys 0-9, rows 3-5 keys 20-29
        start, end = torch.tensor([[0, 0, 0, 20, 20, 20]] * B), torch.tensor([[10, 10, 10, 30, 30, 30]] * B)
        kw = dict(kv_start=start, kv_end=end)
        visible = (j >= start[..., None]) & (j < end[..., None])
        poisoned_keys = torch.zeros(B, Lk, dtype=torch.bool)
        poisoned_keys[:, 4:7] = True  # seen by rows 0-2 only
    unaffected = ~(visible & poisoned_keys[:, None, :]).any(-1)
    assert unaffected.any() and not unaffected.all()
    return q, k, v, kw, poisoned_keys, unaffected


def check_partly_hidden(backend, kind, value, dtype=torch.float32, device="cpu", D=16):
    """Poisoned keys change exactly the rows that see them: out and dQ of every other row are the
    clean ones; the non-finite entries are where the reference puts them."""
    q, k, v, kw, keys, unaffected = partly_hidden(kind, D)
    q, k, v = (t.to(device, dtype) for t in (q, k, v))
    kw = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
    keys, unaffected = keys.to(device), unaffected.to(device)
    k2, v2 = k.clone(), v.clone()
    for b in range(q.shape[0]):
        k2[b, :, keys[b]] = value
        v2[b, :, keys[b]] = value
    results = []
    for kk, vv, which in ((k, v, backend), (k2, v2, backend), (k2, v2, "reference")):
        leaves = [t.clone().requires_grad_() for t in (q, kk, vv)]
        if which == "reference":
            leaves = [t.detach().double().requires_grad_() for t in leaves]
        out = mmkernels.cross_attention(*leaves, backend=which, **kw)
        results.append((out, torch.autograd.grad(out.sum(), leaves)[0]))
    (clean, clean_dq), (out, dq), (ref, ref_dq) = results
    rows = unaffected[:, None, :].expand(out.shape[:3])
    assert torch.equal(out[rows], clean[rows]) and torch.equal(dq[rows], clean_dq[rows])
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref)) and torch.equal(torch.isfinite(dq), torch.isfinite(ref_dq))


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 3e4], ids=["nan", "inf", "large"])
@pytest.mark.parametrize("kind", ["causal", "ranges"])
@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_keys_hidden_from_some_rows_reach_only_the_rows_that_see_them(backend, kind, poison):
    check_partly_hidden(backend, kind, poison)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_co_attention_padded_tokens_holding_nan(backend):
    torch.manual_seed(0)
    a = [torch.randn(2, 2, 9, 16) for _ in range(3)]
    b = [torch.randn(2, 2, 13, 16) for _ in range(3)]
    lengths_a, lengths_b = torch.tensor([9, 4]), torch.tensor([6, 13])
    clean = mmkernels.co_attention(*a, *b, lengths_a=lengths_a, lengths_b=lengths_b, backend="reference")
    for t in a[1:]:
        t[1, :, 4:] = float("nan")
    for t in b[1:]:
        t[0, :, 6:] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (*a, *b)]
    out = mmkernels.co_attention(*leaves, lengths_a=lengths_a, lengths_b=lengths_b, backend=backend)
    for o, c in zip(out, clean):
        valid = torch.isfinite(c)
        torch.testing.assert_close(o[valid], c[valid], atol=2e-5, rtol=1e-4)
    grads = torch.autograd.grad(sum(o.nan_to_num().sum() for o in out), leaves)
    assert (grads[1][1, :, 4:] == 0).all() and (grads[4][0, :, 6:] == 0).all()
    assert all(torch.isfinite(g[..., :4, :]).all() for g in grads[:3])


def test_gated_cross_attention_padded_media_slot_holding_nan():
    """One NaN in a padded media slot made every output of that batch element NaN."""
    torch.manual_seed(0)
    block = mmkernels.nn.GatedCrossAttention(32, 4, media_dim=16)
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
    x, media = torch.randn(2, 5, 32), torch.randn(2, 9, 16)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    clean = block(x, media, media_padding_mask=padding)
    media[1, 7] = float("nan")
    assert torch.isfinite(block(x, media, media_padding_mask=padding)).all()
    torch.testing.assert_close(block(x, media, media_padding_mask=padding), clean)


# --- 5. overflow is not "no key" --------------------------------------------------------------


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_scores_that_all_overflow_are_not_a_silent_zero(backend):
    q = torch.full((1, 1, 2, 4), 1e20)
    k = torch.full((1, 1, 3, 4), -1e20)  # q . k = -4e40: -inf in fp32
    v = torch.randn(1, 1, 3, 4)
    out = mmkernels.cross_attention(q, k, v, scale=1.0, backend=backend)
    assert not (out == 0).all(), "an overflowing row was taken for a row with no visible key"
    ref = mmkernels.cross_attention(q.double(), k.double(), v.double(), scale=1.0, backend="reference")
    assert (out.isnan() | torch.isclose(out.double(), ref, atol=1e-5)).all()


# --- 6. sharp softmaxes keep the 2x error bound ---------------------------------------------------


# The base of each kernel's softmax exponent: the GPU kernels fold log2(e) into the scale and
# use exp2, as FlashAttention does (one more rounding of every score, which a sharp softmax amplifies).
EXP_BASE = {"cpu": "e", "triton": 2, "cuda": 2}


def flash_composite(q, k, v, grad, scale, base="e"):
    """The composite with the softmax backward as FlashAttention computes it: delta = rowsum(dO * O)
    from the output, not rowsum(P * dP); base 2: scores scaled by scale * log2(e), then exp2.
    (out, dq, dk, dv) in q's dtype."""
    if base == 2:
        s = (q @ k.transpose(-1, -2)) * (scale * 1.4426950408889634)
        e = torch.exp2(s - s.amax(-1, keepdim=True))
        p = e / e.sum(-1, keepdim=True)
    else:
        p = torch.softmax((q @ k.transpose(-1, -2)) * scale, -1)
    out = p @ v
    dp = grad @ v.transpose(-1, -2)
    ds = p * (dp - (grad * out).sum(-1, keepdim=True))
    return out, ds @ k * scale, ds.transpose(-1, -2) @ q * scale, p.transpose(-1, -2) @ grad


def backward_noise(q, k, v, grad, scale, ulps=1):
    """The rounding noise of any float32 softmax backward, for dQ and dK: dS = P * (dP - delta)
    cancels where the softmax saturates (exactly 0 for a one-hot row), leaving one rounding of
    P * (|dP| + |delta|), computed from |dO| |V|^T, which dQ = scale dS K and dK = scale dS^T Q
    multiply by scale. At scale 1e30 this noise is the whole float32 gradient, and which of two
    float32 computations lands nearer the truth is luck; 2x the composite cannot be promised there."""
    q, k, v, g = (t.double() for t in (q, k, v, grad))
    p = torch.softmax((q @ k.transpose(-1, -2)) * scale, -1)
    dp = g.abs() @ v.abs().transpose(-1, -2)
    m = p * (dp + (p * dp).sum(-1, keepdim=True))
    eps = ulps * torch.finfo(torch.float32).eps * scale
    return {"grad_q": (eps * (m @ k.abs())).max().item(), "grad_k": (eps * (m.transpose(-1, -2) @ q.abs())).max().item()}


@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1.0, 10.0, 30.0, 100.0, 1e3, 1e30]))
@settings(max_examples=int(os.environ.get("MMKERNELS_SHARP_EXAMPLES", "12")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_sharp_softmax_gradients_within_twice_the_composite_error(backend, seed, scale):
    """Every backend's float32 error is at most 2x (plus the floor) that of the plain composite it
    computes: the reference, softmax((q @ k^T) * scale) @ v under autograd; the kernels, the same
    forward with the backward as FlashAttention writes it (delta = rowsum(dO * O), from the
    output), in the base of their exponent (EXP_BASE). The two backwards differ where the softmax saturates (one key takes P = 1, or two tied keys 1/2
    each): autograd's delta rounds together with dP and cancels, the output's does not, and the
    first composite's error can be 40x below the second's there. dQ and dK also get the rounding
    noise of the softmax backward itself (backward_noise) on top of the floor."""
    torch.manual_seed(seed)
    q, k, v = torch.randn(2, 2, 37, 16), torch.randn(2, 2, 129, 16), torch.randn(2, 2, 129, 16)
    if scale == 1e30:
        k = k.clone()
        k[:, :, 5] = k[:, :, 9]  # two tied maxima: the normalisation must still halve them
    grad = torch.randn(2, 2, 37, 16)

    def run(fn, *xs, g):
        leaves = [x.detach().clone().requires_grad_() for x in xs]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves, g)]

    got = run(lambda *x: mmkernels.cross_attention(*x, scale=scale, backend=backend), q, k, v, g=grad)
    ref = run(lambda *x: mmkernels.cross_attention(*x, scale=scale, backend="reference"), q.double(), k.double(), v.double(),
              g=grad.double())
    plain = run(lambda *x: composite(*x, scale=scale), q, k, v, g=grad)
    flash = flash_composite(q, k, v, grad, scale, EXP_BASE.get(backend, "e"))
    noise = backward_noise(q, k, v, grad, scale)
    for name, a, p, f, r in zip(["out", "grad_q", "grad_k", "grad_v"], got, plain, flash, ref):
        assert_close(name, a, p if backend == "reference" else f, r, torch.float32, noise.get(name, 0.0))


# --- 7. higher-order AD: refused, never silently zero ------------------------------------------


def op_calls():
    """Every public op, as a function of float64 leaves, on the cpu backend."""
    r = lambda *s: torch.randn(*s, dtype=torch.float64)
    att = [r(1, 2, 3, 8), r(1, 1, 4, 8), r(1, 1, 4, 8)]
    co = [r(1, 2, 3, 8), r(1, 2, 3, 8), r(1, 2, 3, 8), r(1, 2, 4, 8), r(1, 2, 4, 8), r(1, 2, 4, 8)]
    yield "cross_attention", att, lambda q, k, v: mmkernels.cross_attention(q, k, v, backend="cpu")
    yield "co_attention", co, lambda *t: sum(o.sum() for o in mmkernels.co_attention(*t, backend="cpu"))
    yield "concat_weighted_fusion", [r(3, 4), r(3, 4), r(2, 8)], lambda a, b, w: mmkernels.concat_weighted_fusion([a, b], w, backend="cpu")
    yield "linear_fusion", [r(3, 4), r(5, 4)], lambda x, w: mmkernels.linear_fusion([x], [w], activation="gelu", backend="cpu")
    yield "decision_fusion", [r(3, 4), r(3, 4)], lambda a, b: mmkernels.decision_fusion([a, b], backend="cpu")
    yield "gated_fusion", [r(3, 4), r(3, 5), r(6, 4), r(6, 5), r(6, 9)], lambda *t: mmkernels.gated_fusion(*t, backend="cpu")
    yield ("gated_residual_linear", [r(3, 6), r(3, 4), r(6, 4), r(1)],
           lambda x, h, w, g: mmkernels.ops.gated_residual_linear(x, h, w, None, gate=g, backend="cpu"))


@pytest.mark.parametrize("name,inputs,fn", list(op_calls()), ids=[c[0] for c in op_calls()])
def test_double_backward_is_refused(name, inputs, fn):
    leaves = [t.requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match=f"{name}: double backward .* is not supported"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)


@pytest.mark.parametrize("name,inputs,fn", list(op_calls()), ids=[c[0] for c in op_calls()])
def test_forward_mode_ad_is_refused(name, inputs, fn):
    tangents = tuple(torch.randn_like(t) for t in inputs)
    with pytest.raises(RuntimeError, match=f"{name} does not support forward-mode AD"):
        torch.func.jvp(fn, tuple(inputs), tangents)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(RuntimeError, match="does not support forward-mode AD"):
        fn(*(fwAD.make_dual(t, d) for t, d in zip(inputs, tangents)))


# --- 8. learnable inputs get their gradients ------------------------------------------------


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_learnable_temperature_gets_its_gradient(backend):
    q, k, v, _ = Case(Lq=5, Lk=9, D=16).make(torch.float64 if backend != "triton" else torch.float32)
    scale = torch.tensor(3.0, dtype=q.dtype, requires_grad=True)
    out = mmkernels.cross_attention(q, k, v, scale=scale, backend=backend)
    (g,) = torch.autograd.grad(out.square().sum(), scale)
    ref_scale = scale.detach().clone().requires_grad_()
    expected = composite(q, k, v, scale=ref_scale)
    (want,) = torch.autograd.grad(expected.square().sum(), ref_scale)
    torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_float_row_mask_gets_its_gradient(backend):
    x, h, w, gate = torch.randn(4, 6), torch.randn(4, 3), torch.randn(6, 3), torch.tensor([0.4])
    mask = torch.rand(4, requires_grad=True)
    out = mmkernels.ops.gated_residual_linear(x, h, w, None, gate=gate, row_mask=mask, backend=backend)
    (g,) = torch.autograd.grad(out.square().sum(), mask)
    m2 = mask.detach().clone().requires_grad_()
    want = x + torch.tanh(gate) * m2[:, None] * (h @ w.T)
    (g2,) = torch.autograd.grad(want.square().sum(), m2)
    torch.testing.assert_close(g, g2, atol=1e-5, rtol=1e-4)


# --- 9. checks that compile must not skip ------------------------------------------------------


@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.0, 0.0], [math.inf, 1.0], [math.nan, 1.0]])
def test_decision_fusion_weights_checked_eagerly_and_compiled(weights):
    logits = [torch.randn(2, 3), torch.randn(2, 3)]
    w = torch.tensor(weights)
    with pytest.raises(ValueError, match="weights must be finite and >= 0 with a positive sum"):
        mmkernels.decision_fusion(logits, w)
    compiled = torch.compile(lambda a, b, w: mmkernels.decision_fusion([a, b], w), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="weights must be finite and >= 0"):
        compiled(*logits, w)


# --- 10. the small ones -----------------------------------------------------------------------


def test_small_ones():
    q = torch.randn(1, 1, 2, 0)
    with pytest.raises(ValueError, match="head dim is 0"):
        mmkernels.cross_attention(q, q, q)
    for bad in ("0.5", 1j, float("nan"), True):
        with pytest.raises(ValueError, match="scale must be"):
            mmkernels.cross_attention(*(torch.randn(1, 1, 2, 4) for _ in range(3)), scale=bad)
    with pytest.raises(ValueError, match=r"features\[0\] must have a last \(feature\) dim"):
        mmkernels.concat_weighted_fusion([torch.tensor(1.0)], torch.randn(1, 1))
    zero_width = [torch.randn(3, 0), torch.randn(3, 0)]  # no feature columns: uniform weights, empty output
    out = mmkernels.concat_weighted_fusion(zero_width, torch.randn(2, 0))
    assert out.shape == (3, 0)
    with pytest.raises(ValueError, match="dropout_p must be a number in"):
        mmkernels.cross_attention(*(torch.randn(1, 1, 2, 4) for _ in range(3)), dropout_p=1.0)


def test_gated_residual_linear_float64_gate_gradient_is_float64():
    args = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    w = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    gate = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, h, w, g: mmkernels.ops.gated_residual_linear(x, h, w, None, gate=g, backend="cpu"),
                                    (*args, w, gate))


def test_invalid_input_is_both_value_error_and_runtime_error():
    assert issubclass(InvalidInput, ValueError) and issubclass(InvalidInput, RuntimeError)
    with pytest.raises(RuntimeError):
        mmkernels.cross_attention(torch.randn(2, 2, 3, 4), torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4))


# --- 11. drop-in crashes ----------------------------------------------------------------------


def test_patched_transformer_encoder_fast_path():
    """torch's encoder fast path (eval, no grad, batch_first) calls self_attn.merge_masks."""
    torch.manual_seed(0)
    encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2,
                                          enable_nested_tensor=False).eval()
    x = torch.randn(2, 7, 32)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(7)
    with torch.no_grad():
        expected = [encoder(x, src_key_padding_mask=padding), encoder(x, mask=causal), encoder(x)]
    assert len(mmkernels.patch(encoder).replaced) == 2
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got = [encoder(x, src_key_padding_mask=padding), encoder(x, mask=causal), encoder(x)]
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    model = torch.nn.Transformer(32, 4, 1, 1, 64, batch_first=True).eval()
    mmkernels.patch(model)
    with torch.no_grad():
        assert model(x, torch.randn(2, 5, 32)).shape == (2, 5, 32)


def test_import_in_an_unbuilt_checkout_says_how_to_build(tmp_path):
    import shutil

    root = os.path.dirname(os.path.dirname(mmkernels.__file__))
    shutil.copytree(os.path.join(root, "mmkernels"), tmp_path / "mmkernels", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    (tmp_path / "setup.py").write_text("")
    script = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
              "sys.path.insert(0, '.'); import mmkernels")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "not built: run `pip install --no-build-isolation -e .`" in proc.stderr and "circular" not in proc.stderr


def test_import_refuses_a_different_torch_minor_version():
    script = "import torch; torch.__version__ = '2.9.0'; import mmkernels"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "was built against torch" in proc.stderr and "2.9.0 is running" in proc.stderr
