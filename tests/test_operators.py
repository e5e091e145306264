"""The operators as torch sees them: opcheck, torch.compile(fullgraph=True), the C++ ops."""
import pytest
import torch

import mmkernels
from attention_cases import Case
from fusion_cases import FusionCase

ops = torch.ops.mmkernels


def attention_args(case, backend=None, requires_grad=True):
    """The operator's arguments: q, k, v, then kv_lengths, key_padding_mask, q_lengths, kv_start,
    kv_end, causal, dropout_p, seed, scale (and the backend for the public op)."""
    q, k, v, kw = case.make(torch.float32)
    if requires_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = [q, k, v, kw.get("kv_lengths"), kw.get("key_padding_mask"), kw.get("q_lengths"), kw.get("kv_start"),
            kw.get("kv_end"), kw.get("causal", False), kw.get("dropout_p", 0.0),
            torch.tensor([987654321]) if kw.get("dropout_p") else None, 0.125]
    return args + [backend] if backend is not None else args


def fusion_args(case, backend=None, requires_grad=True):
    features, weight, bias, values = case.make(torch.float32)
    flat = lambda ts: [t.reshape(-1, t.shape[-1]).detach().requires_grad_(requires_grad) for t in ts]
    args = [flat(features), weight.requires_grad_(requires_grad), bias.requires_grad_(requires_grad) if bias is not None else None, flat(values or []), case.output == "concat"]
    return args + [backend] if backend is not None else args


# opcheck tests registration, fakes and autograd wiring, not numerics: small shapes keep the triton
# interpreter quick.
ATTENTION_CASES = [Case(Lq=9, Lk=33, kv_lengths=True, key_padding_mask=True, q_lengths=True),
                   Case(Lq=9, Lk=33, layout="blhd", Hq=4, Hkv=1), Case(Lq=9, Lk=33, ranges=True, causal=True, dropout=0.2)]
FUSION_OP_CASES = [FusionCase(), FusionCase(values=(5, 7, 9), output="concat")]


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_opcheck_cross_attention(backend, case):
    torch.library.opcheck(ops.cross_attention.default, attention_args(case, backend))
    q, k, v, *visibility, _ = attention_args(case, backend, requires_grad=False)
    out, lse = ops.cross_attention(q, k, v, *visibility, backend)
    torch.library.opcheck(ops.cross_attention_backward.default, [torch.randn_like(out), q, k, v, out, lse, *visibility, backend])


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("case", FUSION_OP_CASES, ids=str)
def test_opcheck_concat_weighted_fusion(backend, case):
    torch.library.opcheck(ops.concat_weighted_fusion.default, fusion_args(case, backend))
    features, weight, bias, values, concat, _ = fusion_args(case, backend, requires_grad=False)
    out, gate = ops.concat_weighted_fusion(features, weight, bias, values, concat, backend)
    torch.library.opcheck(ops.concat_weighted_fusion_backward.default, [torch.randn_like(out), features, weight, values, gate, concat, backend])


@pytest.mark.parametrize("case", ATTENTION_CASES[:1], ids=str)
def test_opcheck_native_ops(case):
    q, k, v, *visibility = attention_args(case, requires_grad=False)
    torch.library.opcheck(ops.native_cross_attention.default, [q, k, v, *visibility])
    out, lse = ops.native_cross_attention(q, k, v, *visibility)
    torch.library.opcheck(ops.native_cross_attention_backward.default, [torch.randn_like(out), q, k, v, out, lse, *visibility])
    args = fusion_args(FUSION_OP_CASES[1], requires_grad=False)
    torch.library.opcheck(ops.native_concat_weighted_fusion.default, args)
    out, gate = ops.native_concat_weighted_fusion(*args)
    torch.library.opcheck(ops.native_concat_weighted_fusion_backward.default, [torch.randn_like(out), args[0], args[1], args[3], gate, args[4]])


class TinyFusionModel(torch.nn.Module):
    """Text attends to image tokens, then the pooled text and image are fused."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q = torch.nn.Linear(d, d)
        self.kv = torch.nn.Linear(d, 2 * d)
        self.gate = torch.nn.Linear(2 * d, 2)

    def forward(self, text, image, image_lengths):
        B, Lq, d = text.shape
        q = self.q(text).view(B, Lq, self.heads, -1).transpose(1, 2)
        k, v = self.kv(image).view(B, image.shape[1], 2, self.heads, -1).unbind(2)
        attended = mmkernels.cross_attention(q, k.transpose(1, 2), v.transpose(1, 2), kv_lengths=image_lengths)
        attended = attended.transpose(1, 2).reshape(B, Lq, d).mean(1)
        return mmkernels.concat_weighted_fusion([attended, image.mean(1)], self.gate.weight, self.gate.bias)


def test_torch_compile_fullgraph_forward_and_backward():
    model = TinyFusionModel()
    text, image = torch.randn(3, 7, 32), torch.randn(3, 11, 32)
    lengths = torch.tensor([11, 4, 1])
    expected = model(text, image, lengths)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(text, image, lengths)
    got_grads = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_build_info():
    facts = mmkernels.info()
    assert facts["mmkernels"] == mmkernels.__version__
    assert "cpu" in facts["compiled_backends"]
    assert facts["built_with_torch"] == torch.__version__.split("+")[0]
    assert "cpu" in facts["backends_cpu"] and "reference" in facts["backends_cpu"]
