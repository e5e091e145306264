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
from attention_cases import EDGE_CASES, Case
from fusion_cases import FusionCase
from tolerance import check_against_composite
from mmkernels.backends import BackendUnavailable, native

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check on a GPU machine)")
COMPILED_TRITON = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                     reason="triton must compile here: run with TRITON_INTERPRET=0 (make gpu-check does)")
BACKENDS = ["triton", "cuda", "reference"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def runs(backend, fn):
    """fn(), or a skip when the backend says it does not take these inputs (the cuda attention
    kernel's head dims and dtypes): its refusal is tested in test_cuda_backend.py."""
    if backend == "cuda" and not native.CUDA_COMPILED:
        pytest.skip("this build has no CUDA kernels")
    try:
        return fn()
    except BackendUnavailable as e:
        pytest.skip(f"{backend}: {e}")


@COMPILED_TRITON
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", EDGE_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_matches_reference(backend, case, dtype):
    if dtype == torch.float32 and backend == "cuda":
        pytest.skip("the cuda attention kernel takes fp16 and bf16")
    runs(backend, lambda: test_cross_attention.check_backend(backend, case, dtype, device="cuda"))


@COMPILED_TRITON
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("kind", ["kv_lengths", "key_padding_mask", "ranges", "causal"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_hidden_keys_never_influence_anything(backend, kind, poison):
    q, k, v, kw, nobody, value = test_hostile_inputs.poisoned(kind, poison)
    q, k, v = (t.cuda().half() for t in (q, k, v))
    kw = {name: t.cuda() if isinstance(t, torch.Tensor) else t for name, t in kw.items()}
    k2, v2 = k.clone(), v.clone()
    for b in range(2):
        k2[b, :, nobody[b].cuda()] = value
        v2[b, :, nobody[b].cuda()] = value
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    clean = runs(backend, lambda: mmkernels.cross_attention(*leaves, backend=backend, **kw))
    clean_grads = torch.autograd.grad(clean.float().sum(), leaves)
    dirty = [t.clone().requires_grad_() for t in (q, k2, v2)]
    out = mmkernels.cross_attention(*dirty, backend=backend, **kw)
    grads = torch.autograd.grad(out.float().sum(), dirty)
    assert torch.equal(out, clean)
    for g, c in zip(grads, clean_grads):
        assert torch.equal(g, c)


@COMPILED_TRITON
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_padding_semantics(backend):
    case = Case(B=3, D=64, kv_lengths=True, q_lengths=True, empty_row=True)
    out, (dq, dk, dv), kw = runs(backend, lambda: test_cross_attention.check_backend(backend, case, torch.float16, device="cuda"))
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
    out = runs(backend, lambda: mmkernels.cross_attention(q, v, v, dropout_p=p, backend=backend))
    assert torch.equal((out.float() * Lk * (1 - p)).round().bool(), expected)


@COMPILED_TRITON
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [FusionCase(), FusionCase(widths=(8, 12, 16), output="concat"),
                                  FusionCase(widths=(24, 24), strided=True, values=(16, 16))], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fusion_matches_reference(backend, case, dtype):
    runs(backend, lambda: test_concat_weighted_fusion.check_backend(backend, case, dtype, device="cuda"))


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
        runs(backend, call)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in calls:
            runs(backend, call)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@COMPILED_TRITON
def test_cuda_graphs_replay_triton_kernels():
    q, k, v, kw = Case(D=64, kv_lengths=True, causal=True).make(torch.float16, "cuda")

    def step(q, k, v, lengths):
        return mmkernels.cross_attention(q, k, v, kv_lengths=lengths, causal=True, backend="triton")

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        args = (torch.randn_like(q), torch.randn_like(k), torch.randn_like(v), kw["kv_lengths"])
        torch.testing.assert_close(compiled(*args), step(*args))
