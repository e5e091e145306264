"""Hardening: property tests against the reference, hostile input, no leaks, no drift,
dynamic shapes, export, threads. (Distributed training: test_distributed.py.)"""
import os
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmkernels
from attention_cases import composite as attention_composite
from fusion_cases import composite as fusion_composite
from tolerance import assert_close

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("MMKERNELS_HYPOTHESIS_PROFILE", "ci"))


@st.composite
def attention_problems(draw, max_len):
    B = draw(st.integers(0, 3))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.integers(1, 3))
    Lq, Lk = draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    D = draw(st.sampled_from([16, 32, 64, 72]))
    layout = draw(st.sampled_from(["bhld", "blhd", "sliced", "expanded"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def make(H, L):
        if layout == "blhd":
            return torch.randn(B, L, H, D, generator=g).transpose(1, 2)
        if layout == "sliced":  # every other row of a longer tensor, and a slice of the head dim
            return torch.randn(B, H, 2 * L, D + 8, generator=g)[:, :, ::2, 4 : 4 + D]
        if layout == "expanded":  # one batch element broadcast (stride 0)
            return torch.randn(1, H, L, D, generator=g).expand(B, H, L, D)
        return torch.randn(B, H, L, D, generator=g)

    q, k, v = make(Hq, Lq), make(Hkv, Lk), make(Hkv, Lk)
    kw = {}
    if draw(st.booleans()):
        kw["kv_lengths"] = torch.randint(0, Lk + 1, (B,), generator=g)
    if draw(st.booleans()):
        kw["key_padding_mask"] = torch.rand(B, Lk, generator=g) < draw(st.sampled_from([0.2, 0.7, 1.0]))
    if draw(st.booleans()):
        kw["q_lengths"] = torch.randint(0, Lq + 1, (B,), generator=g)
    return q, k, v, kw


def check_attention(backend, problem, dtype=torch.float32):
    q, k, v, kw = problem
    q, k, v = (t.to(dtype) for t in (q, k, v))
    grad = torch.randn(q.shape, dtype=dtype)

    def run(fn, *xs, g):
        leaves = [x.detach().clone().requires_grad_() for x in xs]
        out = fn(*leaves)
        return out, torch.autograd.grad(out, leaves, g) if out.numel() else [torch.zeros_like(x) for x in leaves]

    out, grads = run(lambda *x: mmkernels.cross_attention(*x, backend=backend, **kw), q, k, v, g=grad)
    ref, ref_grads = run(lambda *x: mmkernels.cross_attention(*x, backend="reference", **kw), q.double(), k.double(), v.double(), g=grad.double())
    comp, comp_grads = run(lambda *x: attention_composite(*x, **kw), q, k, v, g=grad)
    assert_close("out", out, comp, ref, dtype)
    for name, a, c, r in zip("qkv", grads, comp_grads, ref_grads):
        assert_close(f"grad_{name}", a, c, r, dtype)


@given(attention_problems(max_len=600))
def test_property_attention_cpu(problem):
    check_attention("cpu", problem)


@settings(max_examples=8)
@given(attention_problems(max_len=40))
def test_property_attention_cpu_fp16(problem):
    check_attention("cpu", problem, torch.float16)


@settings(max_examples=10)
@given(attention_problems(max_len=48))
def test_property_attention_triton(problem):
    check_attention("triton", problem)


@st.composite
def fusion_problems(draw):
    M = draw(st.integers(1, 8))
    rows = draw(st.integers(0, 40))
    widths = [draw(st.integers(1, 40)) for _ in range(M)]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    output = draw(st.sampled_from(["sum", "concat"]))
    separate = draw(st.booleans())
    if output == "sum":
        widths = [widths[0]] * M if not separate else widths
    features = [torch.randn(rows, w, generator=g) for w in widths]
    value_width = draw(st.integers(1, 24))
    values = [torch.randn(rows, value_width if output == "sum" else draw(st.integers(1, 24)), generator=g) for _ in range(M)] if separate else None
    weight = torch.randn(M, sum(widths), generator=g) / sum(widths) ** 0.5
    bias = torch.randn(M, generator=g) if draw(st.booleans()) else None
    return features, weight, bias, values, output


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@given(problem=fusion_problems())
@settings(max_examples=12)
def test_property_fusion(backend, problem):
    features, weight, bias, values, output = problem
    leaves = [t.clone().requires_grad_() for t in (*features, weight)]
    out = mmkernels.concat_weighted_fusion(leaves[:-1], leaves[-1], bias, values=values, output=output, backend=backend)
    wide = [t.double().requires_grad_() for t in (*features, weight)]
    ref = fusion_composite(wide[:-1], wide[-1], None if bias is None else bias.double(), None if values is None else [v.double() for v in values], output)
    comp = fusion_composite(features, weight, bias, values, output)
    assert_close("out", out, comp, ref, torch.float32)
    if out.numel():
        g = torch.randn_like(out)
        for a, r in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, wide, g.double())):
            assert_close("grad", a, r.float(), r, torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_nan_and_inf_propagate_like_the_reference(backend):
    """No crash, no hang, no silent zero: a NaN or Inf gives NaN exactly where the reference does."""
    q, k, v = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    q[0, 1, 2, 3] = float("nan")
    k[1, 0, 4, 0] = float("inf")
    ref = mmkernels.cross_attention(q.double(), k.double(), v.double(), backend="reference")
    out = mmkernels.cross_attention(q, k, v, backend=backend)
    assert ref.isnan().any()
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num().float(), atol=1e-5, rtol=1e-4)
    f = [torch.randn(4, 3), torch.randn(4, 3)]
    f[0][1, 2] = float("nan")
    w = torch.randn(2, 6)
    fused = mmkernels.concat_weighted_fusion(f, w, backend=backend)
    assert torch.equal(fused.isnan(), mmkernels.concat_weighted_fusion(f, w, backend="reference").isnan())


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_bitwise_reproducible(backend):
    """cpu and triton claim determinism: no atomics, fixed reduction orders."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 37, 32), torch.randn(2, 2, 129, 32), torch.randn(2, 2, 129, 32)
    lengths = torch.tensor([100, 7])

    def once():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = mmkernels.cross_attention(*leaves, kv_lengths=lengths, backend=backend)
        return [out, *torch.autograd.grad(out.square().sum(), leaves)]

    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


def test_threads_get_correct_results():
    torch.manual_seed(0)
    problems = [(torch.randn(2, 4, 33, 32), torch.randn(2, 4, 65, 32), torch.randn(2, 4, 65, 32)) for _ in range(4)]
    expected = [mmkernels.cross_attention(*p, backend="reference") for p in problems]
    errors = []

    def worker(i):
        try:
            for _ in range(20):
                torch.testing.assert_close(mmkernels.cross_attention(*problems[i], backend="cpu"), expected[i], atol=1e-5, rtol=1e-4)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_no_leak_of_even_one_statistics_tensor_per_step():
    """Shapes where the smallest thing a step saves for backward (the softmax statistics, B*H*Lq
    floats: 32 KiB) leaked once per step would grow memory by 62 MiB over the measured steps."""
    layer = mmkernels.nn.CrossModalAttention(64, 8, batch_first=True)
    x, media = torch.randn(4, 256, 64), torch.randn(4, 16, 64)
    lengths = torch.tensor([16, 5, 0, 9])

    def step():
        out, _ = layer(x, media, media, kv_lengths=lengths, need_weights=False)
        out.sum().backward()

    for _ in range(300):
        step()
    before = _rss_mib()
    for _ in range(2000):
        step()
    assert _rss_mib() - before < 12, f"resident memory grew from {before:.0f} MiB to {_rss_mib():.0f} MiB"


def test_compile_dynamic_shapes_without_recompiling():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    layer = mmkernels.nn.CrossModalAttention(32, 4, batch_first=True)

    def fn(x, media, lengths):
        out, _ = layer(x, media, media, kv_lengths=lengths, need_weights=False)
        return out

    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    first = None
    for B, Lq, Lk in [(2, 5, 9), (3, 7, 11), (5, 13, 17), (4, 6, 33)]:
        x, media = torch.randn(B, Lq, 32, requires_grad=True), torch.randn(B, Lk, 32)
        lengths = torch.randint(1, Lk + 1, (B,))
        out = compiled(x, media, lengths)
        torch.testing.assert_close(out, fn(x, media, lengths))
        out.sum().backward()
        first = counter.frame_count if first is None else first
        assert counter.frame_count == first, f"recompiled for B={B}, Lq={Lq}, Lk={Lk}"


def test_torch_export_of_a_model_with_the_layers():
    from mmkernels.models import MultimodalClassifier

    model = MultimodalClassifier(fusion="cross_attention").eval()
    args = (torch.randint(0, 1000, (2, 12)), torch.randn(2, 3, 16, 16), torch.randn(2, 10, 40))
    kwargs = {"audio_lengths": torch.tensor([10, 4])}
    exported = torch.export.export(model, args, kwargs)
    assert any("mmkernels.cross_attention" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(*args, **kwargs), model(*args, **kwargs))


@pytest.mark.slow
def test_64bit_offsets_cpu():
    """k and v hold more than 2**31 elements: offsets past 2**31 must be computed in 64 bits."""
    B, Lk, D = 2, 2**24 + 3, 64
    assert B * Lk * D > 2**31
    q = torch.randn(B, 1, 1, D, dtype=torch.float16)
    k = torch.empty(B, 1, Lk, D, dtype=torch.float16).normal_()
    v = torch.empty(B, 1, Lk, D, dtype=torch.float16).normal_()
    tail = 1000  # the real keys of batch 1 sit at the very end, past element 2**31
    mask = torch.ones(B, Lk, dtype=torch.bool)
    mask[:, -tail:] = False
    out = mmkernels.cross_attention(q, k, v, key_padding_mask=mask, backend="cpu")
    expected = torch.softmax((q.float() @ k[:, :, -tail:].float().transpose(-1, -2)) * D**-0.5, -1) @ v[:, :, -tail:].float()
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)
