"""The drop-in layers against the stock layers they replace: outputs, gradients, state_dicts."""
import itertools

import pytest
import torch
from torch import nn

import mmkernels
from mmkernels.nn import ConcatWeightedFusion, CrossModalAttention, GatedCrossAttention
from stock_layers import AttentionFusionModule

E, H = 32, 4


def mha_pair(batch_first, kdim, bias):
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=kdim, batch_first=batch_first)
    if bias:  # non-zero biases, so they are really compared
        with torch.no_grad():
            stock.in_proj_bias.normal_()
            stock.out_proj.bias.normal_()
    ours = CrossModalAttention(E, H, bias=bias, kdim=kdim, vdim=kdim, batch_first=batch_first)
    ours.load_state_dict(stock.state_dict())  # the state_dict loads unchanged
    return stock, ours


def inputs(batch_first, kdim, B=3, Lq=5, Lk=7, same_kv=True):
    q = torch.randn(B, Lq, E) if batch_first else torch.randn(Lq, B, E)
    k = torch.randn(B, Lk, kdim or E) if batch_first else torch.randn(Lk, B, kdim or E)
    v = k if same_kv else torch.randn_like(k)
    return q, k, v


def assert_same(stock, ours, args, kwargs):
    a = [t.detach().clone().requires_grad_() for t in args]
    b = [t.detach().clone().requires_grad_() for t in args]
    out_s, w_s = stock(*a, **kwargs)
    out_o, w_o = ours(*b, **kwargs)
    torch.testing.assert_close(out_o, out_s, atol=1e-5, rtol=1e-4)
    if w_s is None:
        assert w_o is None
    else:
        torch.testing.assert_close(w_o, w_s, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(out_s)
    grads_s = torch.autograd.grad(out_s, [*a, *stock.parameters()], g, allow_unused=True)
    grads_o = torch.autograd.grad(out_o, [*b, *ours.parameters()], g, allow_unused=True)
    for gs, go in zip(grads_s, grads_o):
        if gs is None:
            assert go is None or not go.any()
        else:
            torch.testing.assert_close(go, gs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batch_first,kdim,bias,same_kv", list(itertools.product([True, False], [None, 24], [True, False], [True, False])))
def test_cross_modal_attention_matches_multihead_attention(batch_first, kdim, bias, same_kv):
    stock, ours = mha_pair(batch_first, kdim, bias)
    q, k, v = inputs(batch_first, kdim, same_kv=same_kv)
    mask = torch.rand(3, 7) < 0.3
    mask[:, 0] = False  # stock MHA returns NaN for a row that sees no key; ours returns 0
    for kwargs in ({"need_weights": False}, {"key_padding_mask": mask}, {"key_padding_mask": mask, "average_attn_weights": False}):
        assert_same(stock, ours, (q, k, v), kwargs)


@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_modal_attention_fallbacks(batch_first):
    """attn_mask (bool and float), float key_padding_mask, unbatched inputs: a correct fallback."""
    stock, ours = mha_pair(batch_first, None, True)
    q, k, v = inputs(batch_first, None)
    bool_mask = torch.rand(5, 7) < 0.3
    bool_mask[:, 0] = False
    float_kpm = torch.zeros(3, 7).masked_fill(torch.rand(3, 7) < 0.3, float("-inf"))
    float_kpm[:, 0] = 0
    assert_same(stock, ours, (q, k, v), {"attn_mask": bool_mask})
    assert_same(stock, ours, (q, k, v), {"attn_mask": torch.randn(5, 7), "need_weights": False})
    assert_same(stock, ours, (q, k, v), {"key_padding_mask": float_kpm})
    assert_same(stock, ours, (q[:, 0] if not batch_first else q[0], k[:, 0] if not batch_first else k[0], v[:, 0] if not batch_first else v[0]), {})


def test_cross_modal_attention_kv_lengths_fast_path():
    stock, ours = mha_pair(True, None, True)
    q, k, v = inputs(True, None)
    lengths = torch.tensor([7, 3, 1])
    mask = torch.arange(7) >= lengths.view(-1, 1)
    expected, _ = stock(q, k, v, key_padding_mask=mask, need_weights=False)
    got, _ = ours(q, k, v, kv_lengths=lengths, need_weights=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_from_module_and_errors():
    stock = nn.MultiheadAttention(E, H, kdim=16, vdim=16, batch_first=True).eval()
    ours = CrossModalAttention.from_module(stock)
    assert set(ours.state_dict()) == set(stock.state_dict()) and not ours.training
    with pytest.raises(ValueError, match="CrossModalAttention: add_bias_kv=True is not supported"):
        CrossModalAttention(E, H, add_bias_kv=True)
    with pytest.raises(ValueError, match=r"CrossModalAttention: query must be \(B, L, 32\), got \(3, 5, 31\)"):
        ours(torch.randn(3, 5, 31), torch.randn(3, 7, 16), torch.randn(3, 7, 16))
    with pytest.raises(ValueError, match="CrossModalAttention: key must be 3-D with last dim 16"):
        ours(torch.randn(3, 5, 32), torch.randn(3, 7, 32), torch.randn(3, 7, 16))


DIMS = {"text": 12, "image": 20, "audio": 8}


def test_concat_weighted_fusion_matches_attention_fusion_module():
    stock = AttentionFusionModule(DIMS)
    ours = ConcatWeightedFusion(DIMS)
    assert set(ours.state_dict()) == set(stock.state_dict())
    ours.load_state_dict(stock.state_dict())
    emb = {c: torch.randn(6, d, requires_grad=True) for c, d in DIMS.items()}
    expected, got = stock(emb), ours(emb)
    torch.testing.assert_close(got, expected)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, [*emb.values(), *ours.parameters()], g), torch.autograd.grad(expected, [*emb.values(), *stock.parameters()], g)):
        torch.testing.assert_close(a, b)
    seq = {c: torch.randn(2, 4, d) for c, d in DIMS.items()}  # (B, L, D): per-token fusion
    assert ours(seq).shape == (2, 4, 8)
    with pytest.raises(ValueError, match=r"ConcatWeightedFusion: embeddings must have the channels \['audio', 'image', 'text'\]"):
        ours({"text": emb["text"]})


class StockGatedBlock(nn.Module):
    """The same block built from nn.MultiheadAttention, as a model would have it."""

    def __init__(self, dim, heads, media_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=media_dim, vdim=media_dim, batch_first=True)
        self.attn_gate = nn.Parameter(torch.tensor([0.7]))
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ff_gate = nn.Parameter(torch.tensor([-0.4]))

    def forward(self, x, media, row_mask):
        y = x + torch.tanh(self.attn_gate) * row_mask.unsqueeze(-1) * self.attn(self.norm(x), media, media, need_weights=False)[0]
        return y + torch.tanh(self.ff_gate) * self.ff(self.ff_norm(y))


def test_gated_cross_attention():
    fresh = GatedCrossAttention(E, H, media_dim=16)
    x, media = torch.randn(2, 5, E), torch.randn(2, 9, 16)
    torch.testing.assert_close(fresh(x, media), x)  # gates start at 0: the block is the identity
    stock = StockGatedBlock(E, H, 16)
    ours = GatedCrossAttention.from_module(stock)
    row_mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 1]])
    torch.testing.assert_close(ours(x, media, row_mask=row_mask), stock(x, media, row_mask), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="GatedCrossAttention: x must be"):
        ours(x[0], media)


def test_patch_transformer_decoder_and_unpatch():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerDecoder(layer, num_layers=2)).eval()
    fusion = AttentionFusionModule(DIMS)
    holder = nn.ModuleDict({"decoder": model, "fusion": fusion, "odd": nn.MultiheadAttention(E, H, add_bias_kv=True)})
    tgt, memory = torch.randn(2, 6, E), torch.randn(2, 11, E)
    memory_mask = torch.rand(2, 11) < 0.3
    memory_mask[:, 0] = False
    emb = {c: torch.randn(4, d) for c, d in DIMS.items()}
    before = model[0](tgt, memory, memory_key_padding_mask=memory_mask)
    before_fusion = fusion(emb)
    keys = set(holder.state_dict())

    report = mmkernels.patch(holder)
    assert len(report.replaced) == 5  # self- and cross-attention of 2 layers, and the fusion module
    assert [p for p, _, _ in report.left_alone] == ["odd"] and "add_bias_kv" in report.left_alone[0][2]
    assert isinstance(holder["decoder"][0].layers[1].multihead_attn, CrossModalAttention)
    assert set(holder.state_dict()) == keys
    torch.testing.assert_close(holder["decoder"][0](tgt, memory, memory_key_padding_mask=memory_mask), before, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(holder["fusion"](emb), before_fusion)

    assert mmkernels.unpatch(holder) == 5
    assert isinstance(holder["decoder"][0].layers[1].multihead_attn, nn.MultiheadAttention)
    assert holder["fusion"] is fusion


def test_patch_include():
    model = nn.ModuleDict({"a": nn.MultiheadAttention(E, H), "f": AttentionFusionModule(DIMS)})
    report = mmkernels.patch(model, include=["AttentionFusionModule"])
    assert [p for p, _, _ in report.replaced] == ["f"]
    assert report.left_alone == [("a", "MultiheadAttention", "not in include=")]
    with pytest.raises(ValueError, match="patch\\(include=...\\) must name kinds from"):
        mmkernels.patch(model, include=["Linear"])
