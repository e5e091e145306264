"""Bad input gets a clear error naming the argument; backend choice follows its precedence."""
import re

import pytest
import torch

import mmkernels
from mmkernels.backends import BackendUnavailable

q = torch.randn(2, 4, 5, 8)
k = torch.randn(2, 2, 7, 8)
v = torch.randn(2, 2, 7, 8)
f = [torch.randn(3, 4), torch.randn(3, 4)]
w = torch.randn(2, 8)


def attn(**kw):
    args = dict(q=q, k=k, v=v)
    args.update(kw)
    return lambda: mmkernels.cross_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def fuse(features=f, weight=w, **kw):
    return lambda: mmkernels.concat_weighted_fusion(features, weight, **kw)


ERRORS = [
    (attn(k=k.half()), "k must have q's dtype and device (torch.float32 on cpu), got torch.float16 on cpu"),
    (attn(q=q.int()), "q must be float16, bfloat16, float32 or float64, got torch.int32"),
    (attn(q=q[0]), "q must be 4-D (B, H, L, D), got shape (4, 5, 8)"),
    (attn(k=torch.randn(3, 2, 7, 8)), "k must be (B=2, Hkv, Lk, D=8) to match q, got (3, 2, 7, 8)"),
    (attn(k=torch.randn(2, 2, 7, 16), v=torch.randn(2, 2, 7, 16)), "k must be (B=2, Hkv, Lk, D=8) to match q"),
    (attn(v=torch.randn(2, 2, 6, 8)), "v must have k's shape (2, 2, 7, 8), got (2, 2, 6, 8)"),
    (attn(k=torch.randn(2, 3, 7, 8), v=torch.randn(2, 3, 7, 8)), "q's heads must be a multiple of k's heads (grouped-query attention), got Hq=4, Hkv=3"),
    (attn(q=torch.randn(2, 4, 8, 5).transpose(-1, -2)), "q must have a contiguous last dim (stride 1)"),
    (attn(kv_lengths=torch.tensor([1.0, 2.0])), "kv_lengths must be int32 or int64 on q's device (cpu), got torch.float32 on cpu"),
    (attn(kv_lengths=[3, 4]), "kv_lengths must be int32 or int64 on q's device (cpu), got list"),
    (attn(kv_lengths=torch.tensor([1, 2, 3])), "kv_lengths must have shape (2,), got (3,)"),
    (attn(kv_lengths=torch.tensor([1, 8])), "kv_lengths must be in [0, 7], got values in [1, 8]"),
    (attn(q_lengths=torch.tensor([-1, 2])), "q_lengths must be in [0, 5], got values in [-1, 2]"),
    (attn(key_padding_mask=torch.zeros(2, 7)), "key_padding_mask must be bool on q's device (cpu), got torch.float32 on cpu"),
    (attn(key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)), "key_padding_mask must have shape (B, Lk) = (2, 7), got (2, 6)"),
    (attn(backend="nope"), "backend must be 'auto' or one of"),
    (fuse(features=[]), "features must be a non-empty list of tensors"),
    (fuse(features=[f[0], f[1][:2]]), "features[1] must have the leading dims (3,) of features[0], got shape (2, 4)"),
    (fuse(features=[f[0], f[1].double()]), "features[1] must have features[0]'s dtype and device"),
    (fuse(weight=torch.randn(3, 8)), "weight must have shape (M, sum D_m) = (2, 8), got (3, 8)"),
    (fuse(bias=torch.randn(3)), "bias must have shape (2,), got (3,)"),
    (fuse(output="mean"), "output must be 'sum' or 'concat', got 'mean'"),
    (fuse(values=[f[0]]), "values must be a list of 2 tensors (one per feature), got 1"),
    (fuse(values=[torch.randn(3, 4), torch.randn(3, 5)]), "output='sum' needs every values[m] to have the same width, got [4, 5]"),
    (fuse(features=[torch.randn(4, 3, 4).transpose(0, 1), torch.randn(3, 4, 4)], weight=torch.randn(2, 8)), "features[0] must be viewable as (rows, 4) without a copy"),
]


@pytest.mark.parametrize("call,message", ERRORS, ids=[m[:50] for _, m in ERRORS])
def test_error_names_argument(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_impossible_backend_lists_reasons():
    with pytest.raises(BackendUnavailable, match=r"backend 'cuda' can't run cross_attention on cpu torch.float32: .*Backends that can: \[.*'cpu'.*\]"):
        mmkernels.cross_attention(q, k, v, backend="cuda")


def chosen(backend=""):
    from mmkernels.backends import choose
    from mmkernels.backends.base import Problem

    return choose(Problem.of("cross_attention", q, head_dim=8), backend)


def test_precedence(monkeypatch):
    assert chosen() == "cpu"  # auto on cpu tensors
    monkeypatch.setenv("MMKERNELS_BACKEND", "reference")
    assert chosen() == "reference"
    with mmkernels.use_backend("cpu"):
        assert chosen() == "cpu"
        assert chosen(backend="reference") == "reference"
    monkeypatch.setenv("MMKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MMKERNELS_BACKEND must be 'auto' or one of"):
        chosen()


def test_use_backend_reaches_the_kernel(monkeypatch):
    from mmkernels.backends import reference

    calls = []
    real = reference.cross_attention
    monkeypatch.setattr(reference, "cross_attention", lambda *a: calls.append(1) or real(*a))
    mmkernels.cross_attention(q, k, v)
    assert calls == []
    with mmkernels.use_backend("reference"):
        mmkernels.cross_attention(q, k, v)
    assert calls == [1]


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"use_backend\(name\) must be 'auto' or one of"):
        with mmkernels.use_backend("fast"):
            pass


def test_triton_claims_on_a_gpu_are_what_fits_without_spilling(monkeypatch):
    """budgets.ATTENTION_TILES decides which (dtype, head dim) the triton attention takes on CUDA
    tensors: those where every kernel and variant has a tile shape that tools/compile_gpu.py
    measured to fit sm_80 and sm_90; the rest say which kernel does not fit where."""
    from mmkernels.backends import why_not
    from mmkernels.backends.base import Problem
    from mmkernels.backends.triton import budgets

    cuda = torch.device("cuda")
    for dtype, head_dim in ((torch.float16, 128), (torch.bfloat16, 111), (torch.float32, 64), (torch.float16, 40),
                            (torch.float32, 128), (torch.float16, 256)):
        assert why_not("triton", Problem("cross_attention", cuda, dtype, head_dim=head_dim), explicit=True) is None
    # an entry with no shape (as fp32 hd256's dK/dV with dropout on sm_80 had until the table was re-measured)
    monkeypatch.setitem(budgets.ATTENTION_TILES, ("dkdv", "float32", 256, "dropout", "sm_80"), [])
    why = why_not("triton", Problem("cross_attention", cuda, torch.float32, head_dim=200), explicit=True)
    assert why == budgets.claimed("float32", 256) and "no tile shape of its" in why and "sm_80 for float32 at padded head dim 256" in why
