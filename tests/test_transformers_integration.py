"""attn_implementation="mmkernels" in tiny transformers models built from configs (no downloads)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmkernels.integrations.transformers as mmt  # noqa: E402
from transformers import MllamaForCausalLM, MllamaTextConfig  # noqa: E402
from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def registered():
    mmt.register()


def tiny_mllama(attn_implementation):
    config = MllamaTextConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1, 3],
                              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = MllamaForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()
    with torch.no_grad():  # non-zero gates, so the cross-attention layers really contribute
        for layer in model.model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(0.8)
                layer.cross_attn_mlp_gate.fill_(-0.6)
    return model


def inputs(images_per_sample=(2, 1), tokens_per_image=6, text_len=9):
    torch.manual_seed(1)
    B, n_img = len(images_per_sample), max(images_per_sample)
    input_ids = torch.randint(0, 97, (B, text_len))
    vision = torch.randn(B, n_img * tokens_per_image, 64)
    per_image = torch.zeros(B, text_len, n_img, 1)
    for b, n in enumerate(images_per_sample):
        per_image[b, :, :n] = 1  # every text row sees this sample's real images; the rest is padding
    mask, rows = _prepare_cross_attention_mask(per_image, num_vision_tokens=tokens_per_image, dtype=torch.float32)
    return dict(input_ids=input_ids, cross_attention_states=vision, cross_attention_mask=mask, full_text_row_masked_out_mask=rows)


def test_mllama_logits_match_sdpa(monkeypatch):
    calls = []
    real = mmt.cross_attention
    monkeypatch.setattr(mmt, "cross_attention", lambda *a, **k: calls.append(k["key_padding_mask"]) or real(*a, **k))
    sdpa, ours = tiny_mllama("sdpa"), tiny_mllama(mmt.NAME)
    ours.load_state_dict(sdpa.state_dict())
    batch = inputs()
    with torch.no_grad():
        expected = sdpa(**batch).logits
        got = ours(**batch).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # both cross-attention layers took the fused path, with the second sample's padded image
    assert len(calls) == 2
    assert calls[0] is not None and calls[0][1, 6:].all() and not calls[0][0].any()


def test_key_padding_detection():
    B, Lq, Lk = 2, 3, 5
    visible = torch.ones(B, 1, Lq, Lk, dtype=torch.bool)
    visible[1, :, :, 3:] = False
    assert torch.equal(mmt._key_padding(visible, B, Lq, Lk), ~visible[:, 0, 0])
    causal = torch.ones(Lq, Lk, dtype=torch.bool).tril().expand(B, 1, Lq, Lk)
    assert mmt._key_padding(causal, B, Lq, Lk) is None  # differs per row: not a key-padding mask
    bias = torch.randn(B, 1, Lq, Lk)
    assert mmt._key_padding(bias, B, Lq, Lk) is None  # a bias, not a mask


def test_blip2_qformer_matches_sdpa(monkeypatch):
    """BLIP-2's Q-Former: learned queries attend to padded image tokens (cross) and to each other."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    calls = []
    real = mmt.cross_attention
    monkeypatch.setattr(mmt, "cross_attention", lambda *a, **k: calls.append(k["key_padding_mask"]) or real(*a, **k))
    config = Blip2QFormerConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                encoder_hidden_size=48, cross_attention_frequency=1)
    models = []
    for impl in ("sdpa", mmt.NAME):  # each its own config: _from_config records the implementation on it
        torch.manual_seed(0)
        models.append(Blip2QFormerModel._from_config(copy.deepcopy(config), attn_implementation=impl).eval())
    assert models[0].config._attn_implementation == "sdpa"
    models[1].load_state_dict(models[0].state_dict())
    torch.manual_seed(1)
    queries, image = torch.randn(2, 8, 64), torch.randn(2, 11, 48)
    image_mask = torch.ones(2, 11, dtype=torch.long)
    image_mask[1, 7:] = 0  # the second image has 7 real tokens
    with torch.no_grad():
        expected, got = (m(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=image_mask).last_hidden_state for m in models)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    cross = [m for m in calls if m is not None and m.shape[-1] == 11]
    assert len(cross) == 2 and cross[0][1, 7:].all() and not cross[0][0].any()
