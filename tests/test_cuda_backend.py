"""The cuda backend: its dispatch rules (checked here) and its kernels on a GPU.

The GPU tests need a CUDA device and a build with the CUDA kernels; on our CPU machines and in
CI they are skipped with that reason, and CI only compiles the kernels. Run them on a GPU
machine with `pytest tests/test_cuda_backend.py` (README, "On a GPU machine")."""
import pytest
import torch

import mmkernels
from attention_cases import Case
from fusion_cases import FusionCase
from mmkernels.backends import choose, native, why_not
from mmkernels.backends.base import Problem, rows_aligned
from mmkernels.limits import CUDA_ATTENTION_HEAD_DIMS
import test_concat_weighted_fusion
import test_cross_attention

CUDA = torch.device("cuda")
needs_cuda_build = pytest.mark.skipif(not native.CUDA_COMPILED, reason="this build of mmkernels has no CUDA kernels")
needs_gpu = pytest.mark.skipif(
    not (native.CUDA_COMPILED and torch.cuda.is_available()),
    reason="needs a CUDA GPU and a CUDA build of mmkernels; CI only compiles the CUDA kernels",
)
HALF = [torch.float16, torch.bfloat16]


def attention_problem(dtype=torch.float16, head_dim=128, aligned=True):
    return Problem("cross_attention", CUDA, dtype, head_dim=head_dim, aligned=aligned)


# --- dispatch rules: no GPU needed, Problems only describe the inputs ---------------------------


@needs_cuda_build
def test_cuda_attention_runs_when_named():
    for dtype in HALF:
        for head_dim in CUDA_ATTENTION_HEAD_DIMS:
            assert why_not("cuda", attention_problem(dtype, head_dim), explicit=True) is None


@needs_cuda_build
@pytest.mark.parametrize(
    "problem,reason",
    [
        (attention_problem(torch.float32), "takes float16 and bfloat16, got torch.float32"),
        (attention_problem(head_dim=96), "built for head dims (64, 128), got 96"),
        (attention_problem(aligned=False), "16-byte boundaries"),
    ],
    ids=["fp32", "head-dim-96", "misaligned"],
)
def test_cuda_attention_refusals_say_why(problem, reason):
    assert reason in why_not("cuda", problem, explicit=True)


@needs_cuda_build
def test_auto_leaves_the_unverified_attention_kernel_out():
    """Until the kernel has passed the GPU suite, auto must not pick it: triton covers CUDA."""
    if native.CUDA_ATTENTION_VERIFIED:
        pytest.skip("the cuda attention kernel is marked verified")
    assert "not yet run on a GPU" in why_not("cuda", attention_problem(), explicit=False)
    assert choose(attention_problem()) == "triton"
    assert choose(attention_problem(), "cuda") == "cuda"


@needs_cuda_build
def test_cuda_kernels_are_registered_for_the_cuda_key():
    for op in ("native_cross_attention", "native_cross_attention_backward", "native_concat_weighted_fusion"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mmkernels::{op}", "CUDA"), op


def test_rows_aligned():
    base = torch.zeros(2, 5, 3, 72, dtype=torch.float16)
    assert rows_aligned(base[..., :64])  # row stride 72 elements = 144 bytes
    assert rows_aligned(base.transpose(1, 2))
    assert not rows_aligned(base[..., 4:68])  # starts 8 bytes in
    assert not rows_aligned(torch.zeros(2, 3, 5, 60, dtype=torch.float16)[..., :56])  # row stride 120 bytes
    assert rows_aligned(torch.zeros(1, 1, 1, 8, dtype=torch.float16))


# --- the kernels, on a GPU -----------------------------------------------------------------------

ATTENTION_CASES = [
    Case(D=64),
    Case(D=128, Hq=4, Hkv=1, kv_lengths=True, q_lengths=True),
    Case(D=64, Lq=129, Lk=577, key_padding_mask=True, layout="blhd"),
    Case(D=128, B=3, kv_lengths=True, q_lengths=True, empty_row=True, key_padding_mask=True),
    Case(D=64, Lq=1, Lk=1),
    Case(D=128, Hq=2, Hkv=2, Lq=300, Lk=65, layout="blhd", kv_lengths=True),
    # Few query blocks over many keys: the forward splits the keys among CTAs and merges them.
    Case(D=128, B=1, Hq=2, Hkv=1, Lq=16, Lk=2000, kv_lengths=True, key_padding_mask=True),
    Case(D=64, B=2, Hq=1, Hkv=1, Lq=5, Lk=4096, q_lengths=True),
]


@needs_gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_attention_matches_reference(case, dtype):
    test_cross_attention.check_backend("cuda", case, dtype, device="cuda")


@needs_gpu
def test_attention_padding_semantics():
    case = Case(B=3, D=64, kv_lengths=True, q_lengths=True, empty_row=True)
    out, (dq, dk, dv), kw = test_cross_attention.check_backend("cuda", case, torch.float16, device="cuda")
    for b in range(case.B):
        ql, kl = int(kw["q_lengths"][b]), int(kw["kv_lengths"][b])
        assert (out[b, :, ql:] == 0).all() and (dq[b, :, ql:] == 0).all()
        assert (dk[b, :, kl:] == 0).all() and (dv[b, :, kl:] == 0).all()


@needs_gpu
def test_attention_hidden_keys_never_leak():
    """Padded key rows full of inf/NaN change nothing: they are never read into a result."""
    q, k, v, kw = Case(D=64, Lk=200, kv_lengths=True).make(torch.float16, "cuda")
    lengths = kw["kv_lengths"]
    dirty_k, dirty_v = k.clone(), v.clone()
    for b, n in enumerate(lengths.tolist()):
        dirty_k[b, :, n:], dirty_v[b, :, n:] = float("nan"), float("inf")
    clean = mmkernels.cross_attention(q, k, v, kv_lengths=lengths, backend="cuda")
    torch.testing.assert_close(mmkernels.cross_attention(q, dirty_k, dirty_v, kv_lengths=lengths, backend="cuda"), clean,
                               rtol=0, atol=0)


@needs_gpu
def test_attention_backward_is_deterministic():
    q, k, v, kw = Case(D=128, Hq=8, Hkv=2, Lq=257, Lk=513, kv_lengths=True).make(torch.bfloat16, "cuda")
    grad = torch.randn_like(q)
    _, first = test_cross_attention.run_and_grads(lambda *a, **k_: mmkernels.cross_attention(*a, backend="cuda", **k_), q, k, v, grad, **kw)
    _, second = test_cross_attention.run_and_grads(lambda *a, **k_: mmkernels.cross_attention(*a, backend="cuda", **k_), q, k, v, grad, **kw)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
@pytest.mark.parametrize(
    "case",
    [FusionCase(), FusionCase(widths=(8, 12, 16), output="concat"), FusionCase(widths=(24, 24), strided=True, values=(16, 16)),
     FusionCase(widths=(64, 256, 128), lead=(1000,), values=(128, 128, 128))],
    ids=str,
)
def test_fusion_matches_reference(case, dtype):
    test_concat_weighted_fusion.check_backend("cuda", case, dtype, device="cuda")


@needs_gpu
def test_cuda_graphs():
    """torch.compile(mode="reduce-overhead") replays the kernels as CUDA graphs: the results
    must follow new inputs copied into the captured ones."""
    q, k, v, kw = Case(D=64, kv_lengths=True).make(torch.float16, "cuda")
    features, weight, bias, _ = FusionCase(widths=(64, 64)).make(torch.float16, "cuda")

    def step(q, k, v, lengths, f0, f1):
        attn = mmkernels.cross_attention(q, k, v, kv_lengths=lengths, backend="cuda")
        fused = mmkernels.concat_weighted_fusion([f0, f1], weight, bias, backend="cuda")
        return attn, fused

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        args = (torch.randn_like(q), torch.randn_like(k), torch.randn_like(v), kw["kv_lengths"],
                torch.randn_like(features[0]), torch.randn_like(features[1]))
        for got, want in zip(compiled(*args), step(*args)):
            torch.testing.assert_close(got, want)
