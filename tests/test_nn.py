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
    for error in (ValueError, AssertionError):  # stock raises AssertionError; code catching either works
        with pytest.raises(error, match="was expecting embedding dimension of 32, but got 31"):
            ours(torch.randn(3, 5, 31), torch.randn(3, 7, 16), torch.randn(3, 7, 16))
    with pytest.raises(ValueError, match=r"expected `key` with last dim 16 \(the layer's kdim\), got shape \(3, 7, 32\)"):
        ours(torch.randn(3, 5, 32), torch.randn(3, 7, 32), torch.randn(3, 7, 16))
    with pytest.raises(RuntimeError, match=r"The shape of the 3D attn_mask is \(5, 5, 7\), but should be \(12, 5, 7\)"):
        ours(torch.randn(3, 5, 32), torch.randn(3, 7, 16), torch.randn(3, 7, 16), attn_mask=torch.zeros(5, 5, 7))
    with pytest.raises(AssertionError, match="expected `attn_mask` to be `None`, 2-D or 3-D but found 1-D"):
        ours(torch.randn(3, 5, 32), torch.randn(3, 7, 16), torch.randn(3, 7, 16), attn_mask=torch.zeros(7))
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        ours(torch.randn(3, 5, 32), torch.randn(3, 7, 16), torch.randn(3, 7, 16), is_causal=True)


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
    holder = nn.ModuleDict({"decoder": model, "fusion": fusion})
    tgt, memory = torch.randn(2, 6, E), torch.randn(2, 11, E)
    memory_mask = torch.rand(2, 11) < 0.3
    memory_mask[:, 0] = False
    emb = {c: torch.randn(4, d) for c, d in DIMS.items()}
    before = model[0](tgt, memory, memory_key_padding_mask=memory_mask)
    before_fusion = fusion(emb)
    keys = set(holder.state_dict())

    report = mmkernels.patch(holder)
    assert len(report.replaced) == 5 and not report.left_alone  # self- and cross-attention of 2 layers, the fusion
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


@pytest.mark.parametrize("add_bias_kv,add_zero_attn", [(True, False), (False, True), (True, True)])
def test_add_bias_kv_and_add_zero_attn_match_stock(add_bias_kv, add_zero_attn):
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(E, H, kdim=24, vdim=24, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, batch_first=True)
    ours = CrossModalAttention.from_module(stock)
    assert set(ours.state_dict()) == set(stock.state_dict())
    q, k, v = inputs(True, 24)
    mask = torch.rand(3, 7) < 0.3
    causal_ish = torch.ones(5, 7).tril(2).logical_not()  # bool, True = hidden
    for kwargs in ({"need_weights": False}, {"key_padding_mask": mask}, {"attn_mask": causal_ish, "need_weights": False},
                   {"key_padding_mask": torch.ones(3, 7, dtype=torch.bool)}):  # every real key hidden: only the extra rows
        assert_same(stock, ours, (q, k, v), kwargs)
    lengths = torch.tensor([7, 2, 0])
    expected, _ = stock(q, k, v, key_padding_mask=torch.arange(7) >= lengths.view(-1, 1), need_weights=False)
    torch.testing.assert_close(ours(q, k, v, kv_lengths=lengths, need_weights=False)[0], expected, atol=1e-5, rtol=1e-4)


def test_torchscript_matches_eager():
    attn = CrossModalAttention(E, H, kdim=16, vdim=16, batch_first=True, add_zero_attn=True).eval()
    scripted = torch.jit.script(attn)
    q, k = torch.randn(2, 5, E), torch.randn(2, 7, 16)
    kpm = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    for got, expected in zip(scripted(q, k, k, key_padding_mask=kpm), attn(q, k, k, key_padding_mask=kpm)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    lengths = torch.tensor([7, 4])
    torch.testing.assert_close(scripted(q, k, k, kv_lengths=lengths)[0], attn(q, k, k, key_padding_mask=kpm)[0], atol=1e-5, rtol=1e-4)
    fusion = ConcatWeightedFusion(DIMS)
    emb = {c: torch.randn(6, d) for c, d in DIMS.items()}
    torch.testing.assert_close(torch.jit.script(fusion)(emb), fusion(emb))
    with pytest.raises(torch.jit.Error, match="embeddings must have the channels"):
        torch.jit.script(fusion)({"text": emb["text"]})


def test_mixed_bias_dtype_and_float64_weights_as_stock():
    stock = nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.double).eval()
    stock.in_proj_bias = nn.Parameter(torch.randn(24).half())
    ours = CrossModalAttention.from_module(stock)
    q = torch.randn(3, 4, 8, dtype=torch.double)
    mask = torch.tensor([[False, False, True, True]] * 4)
    with torch.no_grad():
        (out_s, w_s), (out_o, w_o) = stock(q, q, q, attn_mask=mask), ours(q, q, q, attn_mask=mask)
    assert out_o.dtype == w_o.dtype == torch.double
    torch.testing.assert_close(out_o, out_s)
    torch.testing.assert_close(w_o, w_s)


def test_nested_tensor_inputs_behave_as_stock():
    stock = nn.MultiheadAttention(E, H, batch_first=True).eval()
    ours = CrossModalAttention.from_module(stock)
    nt = torch.nested.nested_tensor([torch.randn(4, E), torch.randn(6, E)])
    with torch.no_grad():  # stock's fast path takes nested tensors, on our weights too
        for a, b in zip(ours(nt, nt, nt, need_weights=False)[0].unbind(), stock(nt, nt, nt, need_weights=False)[0].unbind()):
            torch.testing.assert_close(a, b)
    with pytest.raises(AssertionError, match="does not support NestedTensor outside of its fast path"):
        ours(nt, nt, nt)


def test_patched_encoder_fast_path_and_train_mode_run_fused():
    """nn.TransformerEncoderLayer's inference fast path calls self_attn.merge_masks and runs
    torch's own kernel on our weights; in training, with dropout, our kernel runs."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 64, dropout=0.1, batch_first=True), 2, enable_nested_tensor=False)
    x = torch.randn(3, 9, E)
    pad = torch.arange(9) >= torch.tensor([9, 5, 7]).view(-1, 1)
    causal = nn.Transformer.generate_square_subsequent_mask(9)
    encoder.eval()
    with torch.no_grad():
        expected = encoder(x, mask=causal, src_key_padding_mask=pad)
    mmkernels.patch(encoder)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x, mask=causal, src_key_padding_mask=pad), expected, atol=1e-5, rtol=1e-4)
    encoder.train()
    encoder(x, mask=causal, src_key_padding_mask=pad, is_causal=True).sum().backward()
    assert [layer.self_attn.last_fallback for layer in encoder.layers] == [None, None]


def test_patched_decoder_in_training_runs_fused_and_reproducibly():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=64, batch_first=True)  # dropout 0.1, the default
    decoder = nn.TransformerDecoder(layer, num_layers=2)
    mmkernels.patch(decoder)
    tgt, memory = torch.randn(2, 6, E), torch.randn(2, 11, E)
    memory_pad = torch.arange(11) >= torch.tensor([11, 6]).view(-1, 1)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    results = []
    for _ in range(2):
        torch.manual_seed(1)
        out = decoder(tgt, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=memory_pad)
        results.append((out, *torch.autograd.grad(out.square().sum(), list(decoder.parameters()))))
        attns = [m for lyr in decoder.layers for m in (lyr.self_attn, lyr.multihead_attn)]
        assert [a.last_fallback for a in attns] == [None] * 4
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_save_after_patch_does_not_store_the_originals(tmp_path):
    def saved_size(model, name):
        torch.save(model, tmp_path / name)
        return (tmp_path / name).stat().st_size

    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(E, H, 64, batch_first=True), 2)
    stock_size = saved_size(decoder, "stock.pt")
    mmkernels.patch(decoder)
    assert saved_size(decoder, "patched.pt") < 1.1 * stock_size
    loaded = torch.load(tmp_path / "patched.pt", weights_only=False)
    x, memory = torch.randn(2, 5, E), torch.randn(2, 7, E)
    decoder.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x, memory), decoder(x, memory))
    assert mmkernels.unpatch(loaded) == 4  # rebuilt as stock layers: no originals in this process
    assert type(loaded.layers[0].self_attn) is nn.MultiheadAttention
    torch.testing.assert_close(loaded(x, memory), decoder(x, memory), atol=1e-5, rtol=1e-4)


def test_masks_are_decided_once_per_forward_and_layers_still_pickle(tmp_path, monkeypatch):
    """A mask's structure is decided once for all layers (the one host sync; a CUDA mask's case,
    forced here on the CPU), each layer recomputing the ranges from the values it is given; and
    a layer that has used a mask still saves."""
    import mmkernels.masks as masks

    monkeypatch.setattr(masks.SHARED, "decide_every_call_on", ())
    monkeypatch.setattr(masks.SHARED, "_entries", {})
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 64, batch_first=True), 3, enable_nested_tensor=False)
    stock = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 64, batch_first=True), 3, enable_nested_tensor=False)
    stock.load_state_dict(encoder.state_dict())
    mmkernels.patch(encoder)
    x = torch.randn(2, 7, E)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    pad = torch.arange(7) >= torch.tensor([7, 4]).view(-1, 1)
    decisions = {"ranges": 0, "visible": 0}
    to_ranges, visible = masks.to_ranges, masks.visible_keys

    def counted_ranges(*a, decided_holes=None, **k):
        decisions["ranges"] += decided_holes is None
        return to_ranges(*a, decided_holes=decided_holes, **k)

    monkeypatch.setattr(masks, "to_ranges", counted_ranges)
    monkeypatch.setattr(masks, "visible_keys", lambda *a, **k: decisions.__setitem__("visible", decisions["visible"] + 1) or visible(*a, **k))
    encoder(x, mask=causal, src_key_padding_mask=pad)  # the encoder turns pad into one float mask for all layers
    assert decisions == {"ranges": 1, "visible": 2}  # the padding mask, and the attn_mask inside to_ranges
    assert all(layer.self_attn.last_fallback is None for layer in encoder.layers)
    encoder.eval(), stock.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x, mask=causal, src_key_padding_mask=pad), stock(x, mask=causal, src_key_padding_mask=pad),
                                   atol=1e-5, rtol=1e-4)
    torch.save(encoder, tmp_path / "encoder.pt")


def _rewrite(mask, how, value_at):
    """Writes into a mask without bumping its version counter (or, in inference mode, with none)."""
    if how == "data":
        mask.data[value_at] = ~mask.data[value_at] if mask.dtype == torch.bool else 0.0
    elif how == "numpy":
        mask.numpy()[value_at] = ~mask.numpy()[value_at] if mask.dtype == torch.bool else 0.0
    else:  # dlpack
        alias = torch.from_dlpack(mask)
        alias[value_at] = ~alias[value_at] if mask.dtype == torch.bool else 0.0


@pytest.mark.parametrize("decided", [False, True], ids=["cpu", "cuda-like"])
@pytest.mark.parametrize("how", ["data", "numpy", "dlpack"])
def test_a_mask_rewritten_behind_its_version_counter_is_never_stale(how, decided, monkeypatch):
    """Rewriting a mask in place through .data, a NumPy view or DLPack bumps no version counter:
    the next call still computes with the new values, as stock does. (cuda-like: the cached-
    decision path of CUDA masks, forced on the CPU.)"""
    import mmkernels.masks as masks

    if decided:
        monkeypatch.setattr(masks.SHARED, "decide_every_call_on", ())
    stock, ours = mha_pair(True, None, True)
    q, k, v = inputs(True, None)
    mask = torch.zeros(5, 7, dtype=torch.bool)  # hidden keys, one span per row
    mask[:, 5:] = True
    torch.testing.assert_close(ours(q, k, v, attn_mask=mask)[0], stock(q, k, v, attn_mask=mask)[0], atol=1e-5, rtol=1e-4)
    version = mask._version
    _rewrite(mask, how, (slice(None), slice(4, 5)))  # still one span per row: keys 0-3
    assert mask._version == version
    torch.testing.assert_close(ours(q, k, v, attn_mask=mask)[0], stock(q, k, v, attn_mask=mask)[0], atol=1e-5, rtol=1e-4)
    _rewrite(mask, how, (slice(None), slice(1, 2)))  # a hole in every row: no longer ranges
    if decided:  # the decision was "ranges": a structure change is an error, never a stale result
        with pytest.raises(RuntimeError, match="rewritten in place"):
            ours(q, k, v, attn_mask=mask)
    else:
        torch.testing.assert_close(ours(q, k, v, attn_mask=mask)[0], stock(q, k, v, attn_mask=mask)[0], atol=1e-5, rtol=1e-4)


MASK_KINDS = ["bool key_padding_mask", "float key_padding_mask", "bool attn_mask", "float attn_mask", "causal"]


@pytest.mark.parametrize("decided", [False, True], ids=["cpu", "cuda-like"])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_layers_run_in_inference_mode_with_masks_made_inside_it(kind, decided, monkeypatch):
    """Inference tensors have no version counter: the mask cache must not need one."""
    import mmkernels.masks as masks

    if decided:
        monkeypatch.setattr(masks.SHARED, "decide_every_call_on", ())
    stock, ours = mha_pair(True, None, True)
    q, k, v = inputs(True, None)
    with torch.inference_mode():
        pad = torch.arange(7) >= torch.tensor([7, 4, 2]).view(-1, 1)
        kw = {"bool key_padding_mask": dict(key_padding_mask=pad),
              "float key_padding_mask": dict(key_padding_mask=torch.zeros(3, 7).masked_fill(pad, float("-inf"))),
              "bool attn_mask": dict(attn_mask=torch.ones(5, 7, dtype=torch.bool).triu(3)),
              "float attn_mask": dict(attn_mask=torch.zeros(5, 7).masked_fill(torch.ones(5, 7, dtype=torch.bool).triu(3), float("-inf"))),
              "causal": dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(7)[2:])}[kind]
        for _ in range(2):  # a miss, then a hit
            got = ours(q, k, v, **kw)[0]
        torch.testing.assert_close(got, stock(q, k, v, **kw)[0], atol=1e-5, rtol=1e-4)
    assert ours.last_fallback is None


def test_a_reused_inference_mode_mask_buffer_refilled_in_place_is_decided_afresh(monkeypatch):
    """Serving loops refill one preallocated mask with copy_: an inference tensor bumps no version
    counter, so a cached decision could not see the refill, and on a GPU the device assert that
    catches a changed structure would end the CUDA context. Inference masks are never cached.
    (cuda-like: the cached-decision path, forced on the CPU.)"""
    import mmkernels.masks as masks

    monkeypatch.setattr(masks.SHARED, "decide_every_call_on", ())
    monkeypatch.setattr(masks.SHARED, "_entries", {})
    stock, ours = mha_pair(True, None, True)
    q, k, v = inputs(True, None)
    with torch.inference_mode():
        buffer = torch.zeros(5, 7, dtype=torch.bool)
        spans = torch.ones(5, 7, dtype=torch.bool).triu(3)  # one span of keys per row
        holes = spans.clone()
        holes[:, 1] = True  # a hole in every row: not ranges
        for mask in (spans, holes, spans):
            buffer.copy_(mask)
            torch.testing.assert_close(ours(q, k, v, attn_mask=buffer)[0], stock(q, k, v, attn_mask=buffer)[0],
                                       atol=1e-5, rtol=1e-4)
    assert not masks.SHARED._entries


def test_torchscript_kv_lengths_in_sequence_first_layout():
    attn = CrossModalAttention(E, H, kdim=16, vdim=16).eval()  # (L, B, E) inputs
    scripted = torch.jit.script(attn)
    q, k = torch.randn(5, 3, E), torch.randn(7, 3, 16)
    lengths = torch.tensor([7, 4, 1])
    torch.testing.assert_close(scripted(q, k, k, kv_lengths=lengths)[0], attn(q, k, k, kv_lengths=lengths)[0], atol=1e-5, rtol=1e-4)


def test_patch_report_says_how_each_layer_runs_and_counts_its_calls():
    """The README's decoder, in training (dropout 0.1, a causal mask, padded memory): every
    attention call runs fused, and the report says so after the run."""
    model = nn.TransformerDecoder(nn.TransformerDecoderLayer(E, H, 64, dropout=0.1, batch_first=True), 2).train()
    report = mmkernels.patch(model)
    assert "0 fused" not in str(report) and "runs fused" in str(report)
    tgt, memory = torch.randn(2, 6, E), torch.randn(2, 9, E)
    model(tgt, memory, tgt_mask=nn.Transformer.generate_square_subsequent_mask(6), tgt_is_causal=True,
          memory_key_padding_mask=torch.arange(9) >= torch.tensor([[9], [4]])).sum().backward()
    assert report.calls() and all(c[:2] == (1, 0) for c in report.calls().values())
    assert "so far 1 fused calls, 0 fallbacks" in str(report)
    bias = torch.randn(6, 6)  # a real float bias: the one kind of mask that falls back
    model(tgt, memory, tgt_mask=bias)
    fallbacks = [c for c in report.calls().values() if c[1]]
    assert len(fallbacks) == 2 and "bias" in fallbacks[0][2] and "(last: attn_mask" in str(report)


def test_patch_takes_subclasses_that_keep_stock_forward():
    class Renamed(nn.MultiheadAttention):
        pass

    class OwnForward(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    class ExtraParameter(nn.MultiheadAttention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.temperature = nn.Parameter(torch.ones(1))

    model = nn.ModuleDict({"a": Renamed(E, H, batch_first=True), "b": OwnForward(E, H), "c": ExtraParameter(E, H)})
    x = torch.randn(2, 5, E)
    before = model["a"](x, x, x)[0]
    report = mmkernels.patch(model)
    assert [p for p, _, _ in report.replaced] == ["a"] and isinstance(model["a"], CrossModalAttention)
    torch.testing.assert_close(model["a"](x, x, x)[0], before, atol=1e-5, rtol=1e-4)
    why = dict((p, w) for p, _, w in report.left_alone)
    assert "overrides forward()" in why["b"] and "temperature" in why["c"]
    assert mmkernels.unpatch(model) == 1 and type(model["a"]) is Renamed


def test_a_layer_pickled_before_the_call_counters_still_runs():
    layer = CrossModalAttention(E, H, batch_first=True)
    del layer.fused_calls, layer.fallback_calls  # as a layer saved by mmkernels 0.1.0 comes back
    x = torch.randn(2, 5, E)
    layer(x, x, x)
    assert layer.fused_calls == 1


class _TwoBlocks(nn.Module):
    """Two parents sharing one attention module, and two attention modules with tied weights."""

    def __init__(self):
        super().__init__()
        shared = nn.MultiheadAttention(E, H, batch_first=True)
        self.a, self.b = nn.ModuleDict({"attn": shared}), nn.ModuleDict({"attn": shared})
        self.c, self.d = nn.MultiheadAttention(E, H, batch_first=True), nn.MultiheadAttention(E, H, batch_first=True)
        self.d.in_proj_weight = self.c.in_proj_weight  # tied
        self.d.out_proj.weight = self.c.out_proj.weight

    def forward(self, x):
        for m in (self.a["attn"], self.b["attn"], self.c, self.d):
            x = x + m(x, x, x, need_weights=False)[0]
        return x


def test_patch_keeps_shared_modules_shared_and_tied_weights_tied():
    torch.manual_seed(0)
    model, stock = _TwoBlocks(), _TwoBlocks()
    stock.load_state_dict(model.state_dict())
    params_before = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # made before patch(): must still train the model
    report = mmkernels.patch(model)
    assert model.a["attn"] is model.b["attn"] and isinstance(model.a["attn"], CrossModalAttention)
    assert model.d.in_proj_weight is model.c.in_proj_weight and model.d.out_proj.weight is model.c.out_proj.weight
    assert sum(p.numel() for p in model.parameters()) == params_before
    assert any("same module" in note for note in report.notes)
    x = torch.randn(2, 5, E)
    for m in (model, stock):
        opt = optimizer if m is model else torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    torch.testing.assert_close(model(x), stock(x), atol=1e-5, rtol=1e-4)
    mmkernels.unpatch(model)
    assert model.a["attn"] is model.b["attn"] and type(model.a["attn"]) is nn.MultiheadAttention
    torch.testing.assert_close(model(x), stock(x), atol=1e-5, rtol=1e-4)


def test_patch_of_a_bare_module_says_to_use_from_module():
    mha = nn.MultiheadAttention(E, H)
    with pytest.raises(ValueError, match="from_module"):
        mmkernels.patch(mha)


@pytest.mark.parametrize("Lq,Lk", [(5, 5), (4, 7), (7, 4)])
def test_is_causal_hint_does_what_stock_does_with_and_without_weights(Lq, Lk):
    """Stock trusts is_causal when no weights and no key padding are asked for (SDPA's top-left
    causal, whatever attn_mask says) and otherwise uses attn_mask; the layer must match both."""
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(E, H, batch_first=True).eval()
    ours = CrossModalAttention.from_module(stock)
    q, kv = torch.randn(2, Lq, E), torch.randn(2, Lk, E)
    not_causal = torch.zeros(Lq, Lk)  # a mask the hint contradicts
    for need_weights in (False, True):
        with torch.no_grad():
            want, _ = stock(q, kv, kv, attn_mask=not_causal, is_causal=True, need_weights=need_weights)
            got, _ = ours(q, kv, kv, attn_mask=not_causal, is_causal=True, need_weights=need_weights)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


SCRIPTABLE = {
    "encoder layer": lambda: nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True),
    "encoder": lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True), 2,
                                             enable_nested_tensor=False),
    "decoder layer": lambda: nn.TransformerDecoderLayer(E, H, 64, dropout=0.0, batch_first=True),
    "transformer": lambda: nn.Transformer(E, H, 1, 1, 64, dropout=0.0, batch_first=True),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated, still used
@pytest.mark.parametrize("name", SCRIPTABLE)
def test_patched_stock_models_still_script(name):
    """torch.jit.script of a patched encoder layer, encoder, decoder layer or nn.Transformer
    compiles (it runs stock math on the replacement's weights) and gives the patched model's numbers,
    with key padding, in eval and in training."""
    torch.manual_seed(0)
    model = SCRIPTABLE[name]()
    mmkernels.patch(model)
    scripted = torch.jit.script(model)
    x = torch.randn(2, 6, E)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    if name.startswith("decoder") or name == "transformer":
        kw = dict(memory_key_padding_mask=pad)
        args = (x[:, :5], x) if name.startswith("decoder") else (x, x[:, :5])  # (tgt, memory) or (src, tgt)
    else:
        kw = dict(src_key_padding_mask=pad)
        args = (x,)
    for training in (False, True):
        model.train(training), scripted.train(training)
        want = model(*args, **kw)
        got = scripted(*args, **kw)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
