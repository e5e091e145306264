"""Every backend on CUDA tensors: triton compiled (not interpreted), cuda, reference.

Skipped without a GPU. `make gpu-check` runs this file with TRITON_INTERPRET=0 (tools/gpu_check.py);
tests/test_cuda_backend.py holds the cuda backend's own GPU tests beside its dispatch rules."""
import os

import pytest
import torch

import mmkernels
import test_concat_weighted_fusion
import test_cross_attention
import test_decision_fusion
import test_linear_fusion
import test_hostile_inputs
import test_varlen_attention
from attention_cases import EDGE_CASES, Case
from fusion_cases import FusionCase
from tolerance import check_against_composite
from mmkernels import spec
from mmkernels.backends import BackendUnavailable, native

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check on a GPU machine)")
COMPILED_TRITON = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                     reason="triton must compile here: run with TRITON_INTERPRET=0 (make gpu-check does)")
BACKENDS = ["triton", "cuda", "reference"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def claimed(backend, op, dtype, head_dim=0):
    """None if the support table (the op's capability: dtypes, head dims) claims the case for the
    backend, else why not."""
    capability = spec.SPECS[op].backends.get(backend)
    if backend == "cuda" and not native.CUDA_COMPILED:
        return "this build has no CUDA kernels"
    if capability is None or dtype not in capability.dtypes:
        return f"{dtype} is not in {backend}'s {op} dtypes"
    if head_dim and capability.head_dims is not None and head_dim not in capability.head_dims:
        return f"head dim {head_dim} is not in {backend}'s {op} head dims"
    return None


def runs(backend, fn, op, dtype, head_dim=0):
    """fn(), or a skip ("not claimed") when the support table does not claim the case: a backend
    that refuses a case it claims fails the test (tools/gpu_check.py fails on any other skip)."""
    why = claimed(backend, op, dtype, head_dim)
    if why is not None:
        pytest.skip(f"not claimed: {why}")
    try:
        return fn()
    except BackendUnavailable as e:
        pytest.fail(f"{backend} refused a case its support table claims: {e}")


@COMPILED_TRITON
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", EDGE_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_matches_reference(backend, case, dtype):
    runs(backend, lambda: test_cross_attention.check_backend(backend, case, dtype, device="cuda"), "cross_attention", dtype, case.D)


@COMPILED_TRITON
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("kind", ["kv_lengths", "key_padding_mask", "ranges", "causal"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_hidden_keys_never_influence_anything(backend, kind, poison):
    q, k, v, kw, nobody, value = test_hostile_inputs.poisoned(kind, poison)
    # head dim 64 (zeros past 16), which the cuda kernels take
    q, k, v = (torch.nn.functional.pad(t, (0, 48)).cuda().half() for t in (q, k, v))
    kw = {name: t.cuda() if isinstance(t, torch.Tensor) else t for name, t in kw.items()}
    k2, v2 = k.clone(), v.clone()
    for b in range(2):
        k2[b, :, nobody[b].cuda()] = value
        v2[b, :, nobody[b].cuda()] = value
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    clean = runs(backend, lambda: mmkernels.cross_attention(*leaves, backend=backend, **kw), "cross_attention", q.dtype, q.shape[-1])
    clean_grads = torch.autograd.grad(clean.float().sum(), leaves)
    dirty = [t.clone().requires_grad_() for t in (q, k2, v2)]
    out = mmkernels.cross_attention(*dirty, backend=backend, **kw)
    grads = torch.autograd.grad(out.float().sum(), dirty)
    assert torch.equal(out, clean)
    for g, c in zip(grads, clean_grads):
        assert torch.equal(g, c)


@COMPILED_TRITON
@COMPILED_TRITON
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_varlen_attention_matches_flash_rules(backend, dtype):
    """Packed sequences (one empty, one past a tile) with a causal window, GQA 8/1, forward and
    backward, against flash-attn's rules in fp64."""
    runs(backend, lambda: test_varlen_attention.test_half_precision(dtype, backend=backend, device="cuda"),
         "cross_attention", dtype, 64)


@COMPILED_TRITON
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_vmap_folds_attention_into_one_launch(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 4, n, 64, generator=g).to("cuda", torch.float16) for n in (17, 70, 70))
    f = lambda q, k, v: mmkernels.cross_attention(q, k, v, backend=backend)
    got = runs(backend, lambda: torch.vmap(f)(q, k, v), "cross_attention", torch.float16, 64)
    torch.testing.assert_close(got, torch.stack([f(q[i], k[i], v[i]) for i in range(3)]))


@pytest.mark.parametrize("kind", ["causal", "ranges"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_keys_hidden_from_some_rows_reach_only_the_rows_that_see_them(backend, kind):
    """The cuda kernels share a key's product between the rows that see it and those that do not
    (tiles.cuh): such a key must hold finite values there, so it gets a large finite poison; the
    triton kernels take NaN."""
    value = 3e4 if backend == "cuda" else float("nan")
    runs(backend, lambda: test_hostile_inputs.check_partly_hidden(backend, kind, value, torch.float16, "cuda", D=64),
         "cross_attention", torch.float16, 64)


@COMPILED_TRITON
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_padding_semantics(backend):
    case = Case(B=3, D=64, kv_lengths=True, q_lengths=True, empty_row=True)
    out, (dq, dk, dv), kw = runs(backend, lambda: test_cross_attention.check_backend(backend, case, torch.float16, device="cuda"),
                                 "cross_attention", torch.float16, case.D)
    for b in range(case.B):
        ql, kl = int(kw["q_lengths"][b]), int(kw["kv_lengths"][b])
        assert (out[b, :, ql:] == 0).all() and (dq[b, :, ql:] == 0).all()
        assert (dk[b, :, kl:] == 0).all() and (dv[b, :, kl:] == 0).all()


@COMPILED_TRITON
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_dropout_mask_is_the_debug_entrys(backend):
    B, H, Lq, Lk, p = 2, 2, 33, 64, 0.25
    q = torch.zeros(B, H, Lq, Lk, device="cuda", dtype=torch.float16)
    v = torch.eye(Lk, device="cuda", dtype=torch.float16).expand(B, H, Lk, Lk)
    torch.manual_seed(3)
    expected = mmkernels.attention_dropout_mask(q, v, p)
    torch.manual_seed(3)
    out = runs(backend, lambda: mmkernels.cross_attention(q, v, v, dropout_p=p, backend=backend), "cross_attention", q.dtype, Lk)
    assert torch.equal((out.float() * Lk * (1 - p)).round().bool(), expected)


@COMPILED_TRITON
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [FusionCase(), FusionCase(widths=(8, 12, 16), output="concat"),
                                  FusionCase(widths=(24, 24), strided=True, values=(16, 16))], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fusion_matches_reference(backend, case, dtype):
    runs(backend, lambda: test_concat_weighted_fusion.check_backend(backend, case, dtype, device="cuda"), "concat_weighted_fusion",
         dtype)


@COMPILED_TRITON
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fusion_family_matches_reference(backend, dtype):
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(64, 100, generator=g).cuda() for _ in range(3)]
    weights = torch.rand(3, generator=g).cuda()
    check_against_composite(lambda t: mmkernels.decision_fusion(t[:3], t[3], mode="prob", backend=backend),
                            lambda t: test_decision_fusion.decision_composite(t[:3], t[3], "prob"), [*logits, weights], dtype)
    feats = [torch.randn(64, w, generator=g).cuda() for w in (32, 48)]
    ws = [torch.randn(40, w, generator=g).cuda() * 0.1 for w in (32, 48)]
    bias = torch.randn(40, generator=g).cuda()
    check_against_composite(lambda t: mmkernels.linear_fusion(t[:2], t[2:4], t[4], activation="gelu", backend=backend),
                            lambda t: test_linear_fusion.linear_composite(t[:2], t[2:4], t[4], "gelu"), [*feats, *ws, bias], dtype)


@COMPILED_TRITON
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_forward_makes_no_host_sync(backend):
    """Lengths, ranges and masks stay on the device: no check reads them on the host (a sync
    per call would stall pipelines and CUDA graphs). After a warm-up call (autotuning may sync)."""
    q, k, v, kw = Case(D=64, kv_lengths=True, q_lengths=True, key_padding_mask=True).make(torch.float16, "cuda")
    feats = [torch.randn(64, 32, device="cuda", dtype=torch.float16) for _ in range(3)]
    w = torch.randn(3, 96, device="cuda", dtype=torch.float16)
    calls = [lambda: mmkernels.cross_attention(q, k, v, **kw, backend=backend),
             lambda: mmkernels.concat_weighted_fusion(feats, w, backend=backend)]
    if backend == "triton":
        calls.append(lambda: mmkernels.decision_fusion(feats, torch.rand(3, device="cuda"), backend=backend))
    for call in calls:
        runs(backend, call, "cross_attention", torch.float16, 64)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in calls:
            runs(backend, call, "cross_attention", torch.float16, 64)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def captured(fn, make_inputs):
    """Captures fn on static inputs into a CUDA graph, then replays it on new inputs copied in:
    (graph outputs, eager outputs on the same new inputs). A graph that captured nothing, or
    replays a stale result, differs from the eager run."""
    static = make_inputs()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, allocator) outside the capture
        fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    fresh = make_inputs()
    for s_, f_ in zip(static, fresh):
        if isinstance(s_, torch.Tensor):
            s_.copy_(f_)
    graph.replay()
    torch.cuda.synchronize()
    return out, fn(*fresh)


@COMPILED_TRITON
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graphs_capture_and_replay_attention(backend):
    q, k, v, kw = Case(D=64, kv_lengths=True, causal=True).make(torch.float16, "cuda")

    def step(q, k, v, lengths):
        return mmkernels.cross_attention(q, k, v, kv_lengths=lengths, causal=True, backend=backend)

    def inputs():
        lengths = torch.randint(1, k.shape[2] + 1, (q.shape[0],), device="cuda", dtype=torch.int32)
        return torch.randn_like(q), torch.randn_like(k), torch.randn_like(v), lengths

    replayed, eager = runs(backend, lambda: captured(step, inputs), "cross_attention", torch.float16, 64)
    assert torch.equal(replayed, eager)
