"""Models to profile, built from configs with random weights (no downloads), with the inputs and
masks their real pipelines make. size="tiny" runs in seconds on a CPU (CI); size="real" has the
real model's dimensions, trimmed (layers, batch) where noted so that a forward stays within about
a minute on a 2-core CPU: the numbers then describe real layer shapes, not a whole checkpoint.

    recipe = build("whisper", size="tiny")
    print(mmkernels.profiling.profile(recipe.model, recipe.inputs, label=recipe.title))
"""
import dataclasses

import torch
from torch import nn

from mmkernels.info import usable_device

SIZES = ("tiny", "real")


@dataclasses.dataclass
class Recipe:
    name: str
    size: str
    description: str  # the model and its shapes, one line
    model: nn.Module  # the stock model, in eval() (dropout off, so both sides compute the same)
    inputs: dict
    notes: list = dataclasses.field(default_factory=list)  # what mmkernels covers here, honestly

    @property
    def title(self) -> str:
        return f"{self.name} ({self.size}): {self.description}"


def _transformers_model(cls, config, device, dtype):
    """A transformers model on its sdpa attention (the stock side); profile() makes the
    mmkernels side from it with attn_implementation="mmkernels"."""
    torch.manual_seed(0)
    return cls._from_config(config, attn_implementation="sdpa").to(device, dtype).eval()


def mllama(size, device, dtype) -> Recipe:
    """Llama 3.2 11B Vision's text decoder, a slice: a self-attention layer and the
    cross-attention layer after it (the checkpoint has 32 of one and 8 of the other), at the
    real width (4096, 32 query / 8 key-value heads, MLP 14336), prefill of a 512-token prompt
    with two interleaved images of 1601 vision tokens: the mask Mllama's processor makes, a BOS
    row that sees no image, then each half of the text sees its own image (the inputs of
    mmkernels.bench's MllamaLayerCase). Cross-attention gates are set non-zero (they start at
    0, which would make the layer a no-op). Batch 1; the vocabulary is cut to 128 tokens: the
    embedding table is not called (the prompt comes in as embeddings)."""
    from transformers import MllamaTextConfig, MllamaTextModel

    from mmkernels.bench.models import SIZES as LAYER_SIZES
    from mmkernels.bench.models import MllamaLayerCase, open_gates

    s = LAYER_SIZES[size]
    layers, cross = (2, [1]) if size == "real" else (4, [1, 3])
    config = MllamaTextConfig(vocab_size=128, hidden_size=s["hidden"], num_attention_heads=s["heads"],
                              num_key_value_heads=s["kv_heads"], intermediate_size=s["ffn"], num_hidden_layers=layers,
                              cross_attention_layers=cross, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = open_gates(_transformers_model(MllamaTextModel, config, device, dtype))
    hidden, images, mask, rows = MllamaLayerCase(size).inputs(torch.device(device), dtype)
    inputs = dict(inputs_embeds=hidden, cross_attention_states=images, cross_attention_mask=mask,
                  full_text_row_masked_out_mask=rows, use_cache=False)
    return Recipe("mllama", size, f"MllamaTextModel, {layers - len(cross)} self + {len(cross)} cross-attention layers, "
                  f"hidden {s['hidden']}, text {s['text']}, 2 images x {s['image_tokens']} tokens", model, inputs,
                  ["transformers' Mllama attention goes through attn_implementation: self (causal) and cross "
                   "(image spans as per-row key ranges) attention both fused"])


def mllama_vision(size, device, dtype) -> Recipe:
    """Llama 3.2 11B Vision's image encoder, a slice: one local and one global layer (the
    checkpoint has 32 and 8) at the real width (1280, 16 heads, MLP 5120), 560 px tiles of 14 px
    patches (1,600 and a class token, padded to 1,608), up to 4 tiles an image: one image of 2
    real tiles, batch 1. The mask is the model's own: padding patches and unused tiles see only
    real patches, real patches see everything."""
    from transformers.models.mllama.configuration_mllama import MllamaVisionConfig
    from transformers.models.mllama.modeling_mllama import MllamaVisionModel

    ratios = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
    if size == "real":
        hidden, heads, ffn, image, patch = 1280, 16, 5120, 560, 14
    else:
        hidden, heads, ffn, image, patch = 32, 4, 64, 20, 4
    config = MllamaVisionConfig(hidden_size=hidden, num_hidden_layers=1, num_global_layers=1, attention_heads=heads,
                                intermediate_size=ffn, vision_output_dim=2 * hidden, image_size=image, patch_size=patch,
                                max_num_tiles=4, intermediate_layers_indices=[0], supported_aspect_ratios=ratios)
    model = _transformers_model(MllamaVisionModel, config, device, dtype)
    g = torch.Generator().manual_seed(0)
    inputs = dict(pixel_values=torch.randn(1, 1, 4, 3, image, image, generator=g).to(device, dtype),
                  aspect_ratio_ids=torch.tensor([[2]], device=device),  # [1, 2]: two tiles
                  aspect_ratio_mask=torch.tensor([[[1, 1, 0, 0]]], device=device))
    tokens = (image // patch) ** 2 + 1
    return Recipe("mllama_vision", size, f"MllamaVisionModel, 1 local + 1 global layer, hidden {hidden}, {heads} heads, "
                  f"4 tiles x {tokens} tokens (2 real), padded to {-(-tokens // 8) * 8}", model, inputs,
                  ["MllamaVisionAttention goes through attn_implementation: its mask (padding patches and tiles see "
                   "only real patches) runs as two fused calls per layer, one per pattern of rows"])


def blip2_qformer(size, device, dtype) -> Recipe:
    """BLIP-2's Q-Former at its real size (12 layers, hidden 768, 12 heads, cross-attention to
    the image every 2nd layer, from EVA ViT-g's 1408-wide tokens): 32 learned queries attend to
    257 image tokens (224 px, patch 14, plus CLS). Batch 4, the images right-padded to 257 with
    fewer real tokens in two of them (as a batch of mixed-resolution images would be), with
    encoder_attention_mask marking the padding."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    if size == "real":
        config = Blip2QFormerConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                    encoder_hidden_size=1408, cross_attention_frequency=2)
        B, queries, tokens, lengths = 4, 32, 257, [257, 257, 197, 145]
    else:
        config = Blip2QFormerConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                    encoder_hidden_size=48, cross_attention_frequency=1)
        B, queries, tokens, lengths = 2, 8, 11, [11, 7]
    model = _transformers_model(Blip2QFormerModel, config, device, dtype)
    g = torch.Generator().manual_seed(0)
    image_mask = (torch.arange(tokens) < torch.tensor(lengths).view(-1, 1)).long()
    inputs = dict(query_embeds=torch.randn(B, queries, config.hidden_size, generator=g).to(device, dtype),
                  encoder_hidden_states=torch.randn(B, tokens, config.encoder_hidden_size, generator=g).to(device, dtype),
                  encoder_attention_mask=image_mask.to(device))
    return Recipe("blip2_qformer", size, f"Blip2QFormerModel, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                  f"B{B}, {queries} queries, image tokens {lengths}", model, inputs,
                  ["the Q-Former's self-attention and its cross-attention to padded image tokens both go through "
                   "attn_implementation"])


def whisper(size, device, dtype) -> Recipe:
    """Whisper base at its real size (d_model 512, 6 encoder + 6 decoder layers, 8 heads, FFN
    2048, vocabulary 51865): 30 s of audio (3000 mel frames, 1500 after the encoder's strided
    convolution) cross-attended by 64 decoder tokens, batch 2, the second transcript
    right-padded to 40 tokens (decoder_attention_mask). Teacher-forced, as in training or
    scoring: no generation loop."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    if size == "real":
        config = WhisperConfig(vocab_size=51865, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                               decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, num_mel_bins=80,
                               max_source_positions=1500, max_target_positions=448)
        B, T, lengths = 2, 64, [64, 40]
    else:
        config = WhisperConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                               max_source_positions=20, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2, decoder_start_token_id=1)
        B, T, lengths = 2, 9, [9, 6]
    model = _transformers_model(WhisperForConditionalGeneration, config, device, dtype)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(B, config.num_mel_bins, 2 * config.max_source_positions, generator=g)
    ids = torch.randint(3, min(config.vocab_size, 1000), (B, T), generator=g)
    text_mask = (torch.arange(T) < torch.tensor(lengths).view(-1, 1)).long()
    inputs = dict(input_features=features.to(device, dtype), decoder_input_ids=ids.to(device),
                  decoder_attention_mask=text_mask.to(device), use_cache=False)
    return Recipe("whisper", size, f"WhisperForConditionalGeneration, d{config.d_model}, {config.encoder_layers}+"
                  f"{config.decoder_layers} layers, B{B}, {config.max_source_positions} audio frames, text {lengths}",
                  model, inputs,
                  ["encoder self-attention (unmasked), decoder causal self-attention with padding and the decoder's "
                   "cross-attention to the audio all go through attn_implementation"])


def transformer_decoder(size, device, dtype) -> Recipe:
    """torch's own nn.TransformerDecoder reading image tokens, the way a captioning or VQA head
    built from stock layers does: 6 layers of width 768 (12 heads, FFN 3072), 64 text tokens
    with a causal mask, memory of 577 image tokens (ViT-L/14 at 336 px) right-padded per sample
    (memory_key_padding_mask), batch 4. mmkernels.patch() swaps each nn.MultiheadAttention for
    CrossModalAttention, weights kept."""
    if size == "real":
        d, heads, layers, B, T, M, lengths = 768, 12, 6, 4, 64, 577, [577, 433, 289, 145]
    else:
        d, heads, layers, B, T, M, lengths = 32, 4, 2, 3, 7, 11, [11, 6, 3]
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
    model = nn.TransformerDecoder(layer, layers).to(device, dtype).eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(tgt=torch.randn(B, T, d, generator=g).to(device, dtype),
                  memory=torch.randn(B, M, d, generator=g).to(device, dtype),
                  tgt_mask=nn.Transformer.generate_square_subsequent_mask(T, device=device, dtype=dtype), tgt_is_causal=True,
                  memory_key_padding_mask=(torch.arange(M) >= torch.tensor(lengths).view(-1, 1)).to(device))
    return Recipe("transformer_decoder", size, f"nn.TransformerDecoder, {layers} layers, d{d}, H{heads}, B{B}, text {T}, "
                  f"image memory {lengths}", model, inputs,
                  ["stock nn.MultiheadAttention (self, causal; cross, padded memory) -> mmkernels.nn.CrossModalAttention"])


RECIPES = {"mllama": mllama, "mllama_vision": mllama_vision, "blip2_qformer": blip2_qformer, "whisper": whisper, "transformer_decoder": transformer_decoder}


def build(name: str, size: str = "tiny", device="cpu", dtype=torch.float32) -> Recipe:
    """The recipe `name` (one of RECIPES) at `size` ("tiny" or "real"), on `device`."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    device = usable_device(device)
    if RECIPES[name] is not transformer_decoder:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ImportError(f"recipe {name!r} builds a transformers model: `pip install transformers` first") from None
        import mmkernels.integrations.transformers as mmt

        mmt.register()
    return RECIPES[name](size, device, dtype)
