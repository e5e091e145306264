"""attn_implementation="mmkernels" in tiny transformers models built from configs (no downloads),
with the masks their processors build: every cross-attention call must take the fused kernel
and the logits must equal sdpa's."""
import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmkernels  # noqa: E402
import mmkernels.integrations.transformers as mmt  # noqa: E402
from mmkernels import masks  # noqa: E402
from mmkernels.masks import to_ranges  # noqa: E402
from transformers import MllamaForCausalLM, MllamaTextConfig  # noqa: E402
from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask  # noqa: E402
from transformers.models.mllama.processing_mllama import (  # noqa: E402
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)


@pytest.fixture(scope="module", autouse=True)
def registered():
    mmt.register()


@pytest.fixture
def calls(monkeypatch):
    """Every fused call's keyword arguments, and every fallback's reason."""
    record = {"fused": [], "fallback": []}
    real, real_fallback = mmt.cross_attention, mmt._fallback
    monkeypatch.setattr(mmt, "cross_attention", lambda *a, **k: record["fused"].append(k) or real(*a, **k))
    monkeypatch.setattr(mmt, "_fallback", lambda why: record["fallback"].append(why) or real_fallback(why))
    return record


def pair(model_class, config, **kw):
    """The same model with sdpa and with mmkernels attention, equal weights; each gets its own
    config (_from_config records the implementation on the config it is given)."""
    models = []
    for impl in ("sdpa", mmt.NAME):
        torch.manual_seed(0)
        models.append(model_class._from_config(copy.deepcopy(config), attn_implementation=impl, **kw).eval())
    models[1].load_state_dict(models[0].state_dict())
    return models


# --- Llama 3.2 Vision (Mllama) --------------------------------------------------------------------

IMAGE, BOS, TILE_TOKENS, MAX_TILES = 96, 1, 5, 3


def mllama_models():
    config = MllamaTextConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1, 3],
                              max_position_embeddings=64, bos_token_id=BOS, eos_token_id=2, pad_token_id=0)
    models = pair(MllamaForCausalLM, config)
    with torch.no_grad():  # non-zero gates, so the cross-attention layers really contribute
        for model in models:
            for layer in model.model.layers:
                if hasattr(layer, "cross_attn_attn_gate"):
                    layer.cross_attn_attn_gate.fill_(0.8)
                    layer.cross_attn_mlp_gate.fill_(-0.6)
    return models


def mllama_batch(token_ids, tiles):
    """The processor's cross-attention mask for prompts `token_ids` (IMAGE marks an image) whose
    images have `tiles` real tiles each (of MAX_TILES: the rest are padded tiles)."""
    torch.manual_seed(1)
    length = max(map(len, token_ids))
    ids = torch.tensor([t + [0] * (length - len(t)) for t in token_ids])
    sparse = [get_cross_attention_token_mask(t, IMAGE) for t in token_ids]
    dense = torch.from_numpy(convert_sparse_cross_attention_mask_to_dense(sparse, tiles, MAX_TILES, length))
    mask, rows = _prepare_cross_attention_mask(dense, num_vision_tokens=TILE_TOKENS, dtype=torch.float32)
    vision = torch.randn(len(token_ids), dense.shape[2] * MAX_TILES * TILE_TOKENS, 64)
    return dict(input_ids=ids.clamp(max=96), cross_attention_states=vision, cross_attention_mask=mask,
                full_text_row_masked_out_mask=rows)


def test_mllama_interleaved_images_with_padded_tiles_are_fused(calls):
    """A BOS row that sees no image (Mllama makes it see everything, then zeroes it), two images
    interleaved with text (the first with a padded tile), and a one-image sample."""
    sdpa, ours = mllama_models()
    batch = mllama_batch([[BOS, IMAGE, 5, 6, 7, IMAGE, 8, 9, 10, 11], [BOS, IMAGE, 12, 13, 14]], tiles=[[2, 3], [1]])
    with torch.no_grad():
        expected, got = sdpa(**batch).logits, ours(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    cross = [c for c in calls["fused"] if "kv_start" in c]
    assert len(cross) == 2 and not calls["fallback"]  # both cross-attention layers fused
    start, end = cross[0]["kv_start"], cross[0]["kv_end"]
    per_image = MAX_TILES * TILE_TOKENS
    assert start[0, 3] == 0 and end[0, 3] == 2 * TILE_TOKENS  # image 1: its 2 real tiles
    assert start[0, 7] == per_image and end[0, 7] == 2 * per_image  # image 2: all 3 tiles
    assert cross[0] is not cross[1] and torch.equal(cross[1]["kv_start"], start)  # converted once, reused


def test_mllama_consecutive_images_with_padding_run_one_call_per_row_pattern(calls):
    """Two images in a row attend as a group; with a padded tile between them and a BOS row that
    sees everything, no row ranges express it, but the rows take two patterns: two fused calls
    per layer, the numbers sdpa's."""
    sdpa, ours = mllama_models()
    batch = mllama_batch([[BOS, IMAGE, IMAGE, 5, 6, 7]], tiles=[[2, 3]])
    with torch.no_grad():
        expected, got = sdpa(**batch).logits, ours(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    cross = [c for c in calls["fused"] if "kv_start" in c and c["key_padding_mask"] is not None]
    assert not calls["fallback"] and len(cross) == 2  # per layer: the BOS row's call, and the text rows' with the hole


def test_a_mask_with_too_many_row_patterns_falls_back_with_a_reason(calls, caplog):
    """Rows that each see their own scattered keys: no ranges, too many patterns for one call
    each; sdpa runs, the reason is logged once."""
    sdpa, ours = mllama_models()
    batch = mllama_batch([[BOS, IMAGE, 5, 6, 7, 8, 9]], tiles=[[3]])
    g = torch.Generator().manual_seed(0)
    scattered = torch.rand(batch["cross_attention_mask"].shape, generator=g) < 0.5
    batch["cross_attention_mask"] = torch.zeros_like(batch["cross_attention_mask"]).masked_fill(scattered, torch.finfo(torch.float32).min)
    with caplog.at_level(logging.DEBUG, logger="mmkernels.integrations.transformers"):
        mmt._logged.clear()
        with torch.no_grad():
            expected, got = sdpa(**batch).logits, ours(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert calls["fallback"] and "not one span" in calls["fallback"][0] and "patterns" in calls["fallback"][0]
    assert sum("falls back to sdpa" in r.message for r in caplog.records) == 1  # logged once


def test_mllama_vision_encoder_with_padded_patches_and_tiles_is_fused(calls):
    """MllamaVisionAttention's mask: patches padded to a multiple of 8 and unused tiles, where
    real rows see every key and padding rows only the real ones (the outer product of the padding).
    Each of the three layers (two local, one global) runs two fused calls and no sdpa."""
    from transformers.models.mllama.configuration_mllama import MllamaVisionConfig
    from transformers.models.mllama.modeling_mllama import MllamaVisionModel

    config = MllamaVisionConfig(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                                intermediate_size=64, vision_output_dim=96, image_size=20, patch_size=4, max_num_tiles=4,
                                intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1], [2, 2]])
    sdpa, ours = pair(MllamaVisionModel, config)
    pixels = torch.randn(2, 1, 4, 3, 20, 20)  # 25 patches and a class token a tile, padded to 32
    aspect_ratio_ids, tiles = torch.tensor([[4], [2]]), torch.tensor([[[1, 1, 1, 1]], [[1, 1, 0, 0]]])
    with torch.no_grad():
        expected = sdpa(pixels, aspect_ratio_ids, tiles).last_hidden_state
        got = ours(pixels, aspect_ratio_ids, tiles).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not calls["fallback"] and len(calls["fused"]) == 3 * 2


# --- IDEFICS --------------------------------------------------------------------------------------


def test_idefics_cross_layers_are_fused(calls):
    """Each text token sees its latest image; tokens before the first image see none."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    config = IdeficsConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           cross_layer_interval=1, max_position_embeddings=64, alpha_initializer="ones",
                           vision_config={"embed_dim": 48, "image_size": 16, "patch_size": 8, "num_hidden_layers": 1,
                                          "num_attention_heads": 4, "intermediate_size": 64},
                           perceiver_config={"use_resampler": False})
    sdpa, ours = pair(IdeficsForVisionText2Text, config)
    torch.manual_seed(2)
    B, L, n_images, tokens = 2, 9, 2, 6
    ids = torch.randint(3, 100, (B, L))
    latest = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 1, 1], [-1, 0, 0, 0, 0, 0, 0, 0, 0]])  # the processor's image index
    image_mask = torch.nn.functional.one_hot(latest.clamp(min=0), n_images) * (latest >= 0).unsqueeze(-1)
    embeddings = torch.randn(B, n_images, tokens, 48)
    kw = dict(input_ids=ids, image_encoder_embeddings=embeddings, image_attention_mask=image_mask, use_cache=False)
    with torch.no_grad():
        expected, got = sdpa(**kw).logits, ours(**kw).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    cross = [c for c in calls["fused"] if "kv_start" in c and c["kv_end"].max() <= n_images * tokens]
    assert len(cross) == config.num_hidden_layers and not calls["fallback"]
    assert cross[0]["kv_end"][0, 0] == cross[0]["kv_start"][0, 0]  # before the first image: nothing
    assert cross[0]["kv_start"][0, 6] == tokens and cross[0]["kv_end"][0, 6] == 2 * tokens


# --- BLIP-2 Q-Former ------------------------------------------------------------------------------


def test_blip2_qformer_matches_sdpa(calls):
    """Learned queries attend to padded image tokens (cross) and to each other."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    config = Blip2QFormerConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                encoder_hidden_size=48, cross_attention_frequency=1)
    sdpa, ours = pair(Blip2QFormerModel, config)
    assert sdpa.config._attn_implementation == "sdpa"
    torch.manual_seed(1)
    queries, image = torch.randn(2, 8, 64), torch.randn(2, 11, 48)
    image_mask = torch.ones(2, 11, dtype=torch.long)
    image_mask[1, 7:] = 0  # the second image has 7 real tokens
    with torch.no_grad():
        expected, got = (m(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=image_mask).last_hidden_state
                         for m in (sdpa, ours))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not calls["fallback"]
    cross = [c for c in calls["fused"] if "kv_end" in c and c["kv_end"].max() <= 11 and c["kv_end"].shape[1] == 8]
    assert len(cross) == 2 and (cross[0]["kv_end"][1] == 7).all() and (cross[0]["kv_end"][0] == 11).all()


# --- Qwen2-VL's vision encoder --------------------------------------------------------------------


def test_qwen2_vl_packed_vision_encoder_is_fused(calls):
    """Several images packed into one sequence (cu_seqlens): transformers runs one attention call
    per frame of each image for implementations that are not flash-attn's, each without a mask; every one is
    fused, and the encoder's output equals sdpa's."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    config = Qwen2VLVisionConfig(depth=2, embed_dim=64, hidden_size=64, num_heads=4, patch_size=2, temporal_patch_size=1,
                                 spatial_merge_size=2, in_channels=3)
    sdpa, ours = pair(Qwen2VisionTransformerPretrainedModel, config)
    grid = torch.tensor([[1, 4, 6], [1, 2, 2], [2, 4, 4]])  # (t, h, w) patches of three images
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 2)
    with torch.no_grad():
        expected, got = (m(pixels, grid_thw=grid).last_hidden_state for m in (sdpa, ours))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not calls["fallback"] and len(calls["fused"]) == 2 * int(grid[:, 0].sum())  # every layer, every frame


# --- the mask conversion --------------------------------------------------------------------------


def test_masks_to_ranges():
    B, Lq, Lk = 2, 4, 10
    visible = torch.zeros(B, 1, Lq, Lk, dtype=torch.bool)
    visible[0, 0, :, 2:6] = True
    visible[0, 0, 0] = False  # an empty row
    visible[1, 0, :, 0:9] = True
    visible[1, 0, :, 4] = False  # a key no row of batch 1 sees: a hole every row shares
    (start, end, hidden), why = to_ranges(visible, B, Lq, Lk, bool_true_means="visible")
    assert why is None
    assert start.tolist() == [[0, 2, 2, 2], [0, 0, 0, 0]] and end.tolist() == [[0, 6, 6, 6], [9, 9, 9, 9]]
    assert hidden[1].nonzero().flatten().tolist() == [4, 9] and hidden[0, 0] and not hidden[0, 3]
    causal = torch.ones(Lq, Lk).tril(Lk - Lq).log()  # additive: 0 and -inf
    (start, end, hidden), _ = to_ranges(causal, B, Lq, Lk, bool_true_means="visible")
    assert end.tolist() == [[7, 8, 9, 10]] * B and hidden is None
    holes = visible.clone()
    holes[1, 0, 2, 4] = True  # key 4 seen by one row only: a hole in the others
    assert "not one span" in to_ranges(holes, B, Lq, Lk, bool_true_means="visible")[1]
    assert "bias" in to_ranges(torch.randn(B, 1, Lq, Lk), B, Lq, Lk, bool_true_means="visible")[1]
    per_head = visible.expand(B, 2, Lq, Lk).clone()
    per_head[0, 1, 1, 2] = False
    assert "heads" in to_ranges(per_head, B, Lq, Lk, bool_true_means="visible")[1]


def test_row_classes_split_a_mask_into_calls_whose_outputs_sum_to_it():
    """Padding rows that see only real keys, real rows that see everything (the outer product of
    the padding), per batch: one call per pattern, each row in one of them; the decision cached,
    recomputed without a sync; a fifth pattern is refused."""
    B, L = 2, 20
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, 7:10], pad[0, 17:], pad[1, 15:] = True, True, True
    mask = torch.zeros(B, 1, L, L).masked_fill((pad[:, :, None] & pad[:, None, :])[:, None], torch.finfo(torch.float32).min)
    calls, why = masks.row_classes(mask, B, L, L, bool_true_means="visible")
    assert why is None and len(calls) == 2
    (start0, end0, hidden0), (start1, end1, hidden1) = calls
    assert hidden0 is None and torch.equal(hidden1, pad)  # real rows see every key: no mask at all
    assert torch.equal(end0 > start0, ~pad) and torch.equal(end1 > start1, pad)
    q, k, v = (torch.randn(B, 4, L, 16, dtype=torch.float64) for _ in range(3))
    got = sum(mmkernels.cross_attention(q, k, v, kv_start=s, kv_end=e, key_padding_mask=h) for s, e, h in calls)
    torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.double()))
    cache = masks.RangeCache()
    cache.decide_every_call_on = ()
    first = cache.classes(mask, B, L, L, bool_true_means="visible")[0]
    again = cache.classes(mask, B, L, L, bool_true_means="visible")[0]
    assert all(torch.equal(a, b) for x, y in zip(first, again) for a, b in zip(x[:2], y[:2]))
    five = torch.zeros(1, 1, 5, 6, dtype=torch.bool)
    for row in range(5):
        five[0, 0, row, row] = five[0, 0, row, 5] = True  # five rows, five patterns with holes
    assert "more than 4 patterns" in masks.row_classes(five, 1, 5, 6, bool_true_means="visible")[1]


def test_causal_self_attention_without_a_mask_is_fused(calls):
    """Mllama's text self-attention on a prompt with no padding: sdpa gets is_causal and no mask."""
    sdpa, ours = mllama_models()
    ids = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        expected, got = sdpa(input_ids=ids).logits, ours(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert calls["fused"] and all(c.get("causal") or "kv_end" in c for c in calls["fused"])


def test_patch_switches_a_transformers_model_to_the_fused_attention(calls):
    """A Hugging Face model's attention runs in functions, not in nn.MultiheadAttention modules:
    patch() switches attn_implementation (and says so), unpatch() switches it back."""
    sdpa, _ = mllama_models()
    batch = mllama_batch([[BOS, IMAGE, 5, 6, 7, IMAGE, 8, 9, 10, 11]], tiles=[[2, 3]])
    with torch.no_grad():
        expected = sdpa(**batch).logits
    report = mmkernels.patch(sdpa)
    assert not report.replaced and "attn_implementation 'sdpa' -> 'mmkernels'" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    assert len([c for c in calls["fused"] if "kv_start" in c]) == 2
    assert mmkernels.unpatch(sdpa) == 1 and sdpa.config._attn_implementation == "sdpa"


def test_patch_include_can_leave_the_attention_implementation_alone():
    sdpa, _ = mllama_models()
    wrapper = torch.nn.ModuleDict({"lm": sdpa})  # a transformers model inside the user's own module
    report = mmkernels.patch(wrapper, include=["MultiheadAttention"])
    assert sdpa.config._attn_implementation == "sdpa" and not report.notes
    report = mmkernels.patch(wrapper)
    assert sdpa.config._attn_implementation == mmt.NAME and "MllamaForCausalLM: attn_implementation" in str(report)
    assert mmkernels.unpatch(wrapper) == 1 and sdpa.config._attn_implementation == "sdpa"


def test_llama_left_padded_batch_in_inference_mode(calls):
    """Serving: a left-padded batch under torch.inference_mode(), whose masks are inference
    tensors (no version counter for the mask cache to key on); logits equal sdpa's on every
    position a real token holds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    sdpa, ours = pair(LlamaForCausalLM, config)
    ids = torch.randint(3, 96, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4], mask[2, :1] = 0, 0
    for _ in range(2):  # the second call may be served from the mask cache
        with torch.inference_mode():
            expected = sdpa(input_ids=ids, attention_mask=mask).logits
            got = ours(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert calls["fused"]


def compiled_graph_ops(model, **inputs):
    """The model compiled (fullgraph, no graph break) and run once: its output and every op its
    graphs call, torch.cond's branch graphs included."""
    ops = set()

    def record(gm, example_inputs):
        for module in gm.modules():
            if isinstance(module, torch.fx.GraphModule):
                ops.update(node.target for node in module.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=record, fullgraph=True)(**inputs).logits
    return out, ops


@pytest.mark.parametrize("holes", [False, True], ids=["padding", "a mask with holes"])
def test_masks_inside_torch_compile_pick_fused_or_sdpa_on_the_device(holes):
    """A left-padded batch's 4-D mask inside torch.compile: its ranges are computed on the device
    and torch.cond runs the fused call where they express the mask (padding), sdpa where they do
    not (a hole inside a row); the logits equal sdpa's either way."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    sdpa, ours = pair(LlamaForCausalLM, config)
    ids = torch.randint(3, 96, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    visible = torch.ones(9, 9, dtype=torch.bool).tril() & mask.bool().view(2, 1, 1, 9)
    if holes:
        visible[1, 0, 6, 2] = False  # row 6 of the second sample skips key 2: not one span
    visible |= torch.eye(9, dtype=torch.bool)  # every row sees itself (no NaN rows in sdpa)
    with torch.no_grad():
        expected = sdpa(input_ids=ids, attention_mask=visible, use_cache=False).logits
    got, ops = compiled_graph_ops(ours, input_ids=ids, attention_mask=visible, use_cache=False)  # (a cache breaks the graph)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.ops.higher_order.cond in ops and torch.ops.mmkernels.cross_attention in ops


def test_traced_ranges_say_on_the_device_whether_they_express_the_mask():
    """What torch.cond branches on (above): the ranges of a causal, left-padded mask and True; False
    for a hole inside a row, a bias, or heads that differ."""
    from mmkernels.masks import traced_ranges

    visible = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 1, 5, 5).clone()
    visible[0, :, :, :2] = False
    (start, end, hidden, exact), _ = traced_ranges(visible, 2, 5, 5, bool_true_means="visible")
    assert bool(exact) and start[0].tolist() == [0, 0, 2, 2, 2] and end[0].tolist() == [0, 0, 3, 4, 5]  # rows 0, 1 see nothing
    assert end[1].tolist() == [1, 2, 3, 4, 5]
    assert hidden[0].tolist() == [True, True, False, False, False]
    holes = visible.clone()
    holes[1, 0, 4, 2] = False
    assert not bool(traced_ranges(holes, 2, 5, 5, bool_true_means="visible")[0][3])
    bias = torch.zeros(2, 1, 5, 5).masked_fill(~visible, float("-inf"))
    assert bool(traced_ranges(bias, 2, 5, 5, bool_true_means="visible")[0][3])
    assert not bool(traced_ranges(bias + 0.5, 2, 5, 5, bool_true_means="visible")[0][3])
    per_head = visible.expand(2, 2, 5, 5).clone()
    per_head[0, 1, 3, 3] = False
    assert not bool(traced_ranges(per_head, 2, 5, 5, bool_true_means="visible")[0][3])


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32], ids=["bool", "additive"])
def test_a_decoding_steps_mask_is_key_padding(dtype, calls):
    """One query row: any visible set, holes included, is a key_padding_mask (no ranges to decide),
    for a per-sample mask and for one shared by the batch; the output equals sdpa's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module:
        is_causal, num_key_value_groups = True, 4

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 8, 16, generator=g).transpose(1, 2)
    k, v = (torch.randn(2, 2, 12, 16, generator=g) for _ in range(2))
    for visible in (torch.rand(2, 1, 1, 12, generator=g) > 0.4, torch.rand(1, 1, 1, 12, generator=g) > 0.4):
        visible[..., 0] = True  # no empty row (sdpa would give NaN there, we 0)
        mask = visible if dtype == torch.bool else torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
        got = mmt.attention_forward(Module(), q, k, v, mask, scaling=0.25)[0]
        torch.testing.assert_close(got, sdpa_attention_forward(Module(), q, k, v, mask, scaling=0.25)[0])
        assert calls["fused"][-1]["kv_start"] is None and calls["fused"][-1]["key_padding_mask"].shape == (2, 12)
