"""Whole layers of real models, stock against mmkernels: what a user sees after swapping."""
import copy
import dataclasses
import functools

import torch

SIZES = {
    # Llama 3.2 11B Vision's cross-attention decoder layer; a prompt of 512 text tokens and two
    # images of 1601 vision tokens each (one tile of the vision tower's output).
    "real": dict(hidden=4096, heads=32, kv_heads=8, ffn=14336, text=512, image_tokens=1601),
    "tiny": dict(hidden=64, heads=4, kv_heads=2, ffn=96, text=24, image_tokens=20),
}


@dataclasses.dataclass
class MllamaLayerCase:
    """One MllamaCrossAttentionDecoderLayer (transformers), prefill, with the mask Mllama's
    processor builds for two interleaved images (a BOS row that sees none, then each half of
    the text sees its image): attn_implementation "sdpa" against "mmkernels"."""

    size: str
    mode: str = "fwd"
    memory_only: bool = False
    B: int = 1

    op = "mllama_cross_layer"

    @staticmethod
    def peers(case, device, dtype, full):
        return mllama_providers(case, device, dtype, full)

    @property
    def shape(self):
        s = SIZES[self.size]
        return f"B{self.B} hidden{s['hidden']} H{s['heads']}/{s['kv_heads']} text{s['text']} images2x{s['image_tokens']}"

    def inputs(self, device, dtype):
        from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

        s = SIZES[self.size]
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(self.B, s["text"], s["hidden"], generator=g).to(device, dtype)
        images = torch.randn(self.B, 2 * s["image_tokens"], s["hidden"], generator=g).to(device, dtype)
        per_image = torch.zeros(self.B, s["text"], 2, 1, dtype=torch.long)
        half = s["text"] // 2
        per_image[:, 1:half, 0] = 1
        per_image[:, half:, 1] = 1
        mask, rows = _prepare_cross_attention_mask(per_image, num_vision_tokens=s["image_tokens"], dtype=dtype)
        return hidden, images, mask.to(device), rows.to(device)

    def differentiable(self, inputs):
        hidden, images, mask, rows = inputs
        leaves = [hidden.detach().requires_grad_(), images.detach().requires_grad_()]
        return leaves, (*leaves, mask, rows)

    def flops(self, _) -> float:
        s = SIZES[self.size]
        tokens, kv, d = self.B * s["text"], self.B * 2 * s["image_tokens"], s["hidden"]
        kv_dim = d * s["kv_heads"] // s["heads"]
        gemms = 2 * tokens * d * d * 2 + 2 * kv * d * kv_dim * 2 + 2 * tokens * d * s["ffn"] * 3
        attention = 4 * tokens * s["image_tokens"] * d  # each text row sees one image (mmkernels' work)
        return (gemms + attention) * (3.0 if self.mode == "fwd+bwd" else 1.0)

    def lengths_label(self, _):
        return "images"


@functools.cache
def _mllama_layer(size, device_type, dtype):
    from transformers import MllamaTextConfig
    from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer

    import mmkernels.integrations.transformers as mmt

    mmt.register()
    s = SIZES[size]
    config = MllamaTextConfig(hidden_size=s["hidden"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                              intermediate_size=s["ffn"], num_hidden_layers=1, cross_attention_layers=[0])
    torch.manual_seed(0)
    layer = MllamaCrossAttentionDecoderLayer(config, layer_idx=0).to(device_type, dtype).eval()
    with torch.no_grad():
        layer.cross_attn_attn_gate.fill_(0.8)
        layer.cross_attn_mlp_gate.fill_(0.5)
    return layer


def mllama_providers(case, device, dtype, full: bool):
    """The same layer (shared weights) called with each attention implementation."""
    layer = _mllama_layer(case.size, device.type, dtype)

    def run(implementation):
        def call(hidden, images, mask, rows):
            layer.cross_attn.config._attn_implementation = implementation
            return layer(hidden, cross_attention_states=images, cross_attention_mask=mask, attention_mask=None,
                         full_text_row_masked_out_mask=rows)[0]

        return call

    return {"transformers-sdpa": run("sdpa"), "mmkernels": run("mmkernels")}


@dataclasses.dataclass
class DecoderTrainCase:
    """nn.TransformerDecoder in training, as torch builds it: dropout 0.1 (the default), causal
    self-attention (generate_square_subsequent_mask, tgt_is_causal) and cross-attention over
    right-padded memory (lengths uniform in [M/4, M]); stock against the same decoder after
    mmkernels.patch(). Dropout draws differ between the two, so the outputs are not compared
    here: tests/test_nn.py checks the patched decoder against stock with dropout 0."""

    B: int
    tgt: int
    memory: int
    d_model: int
    heads: int
    layers: int = 2
    mode: str = "fwd+bwd"
    memory_only: bool = False

    op = "transformer_decoder_train"
    comparable = False

    @staticmethod
    def peers(case, device, dtype, full):
        return decoder_providers(case, device, dtype)

    @property
    def shape(self):
        return f"B{self.B} d{self.d_model} H{self.heads} x{self.layers} tgt{self.tgt} memory{self.memory}"

    def inputs(self, device, dtype):
        g = torch.Generator().manual_seed(0)
        tgt = torch.randn(self.B, self.tgt, self.d_model, generator=g).to(device, dtype)
        memory = torch.randn(self.B, self.memory, self.d_model, generator=g).to(device, dtype)
        lengths = torch.randint(self.memory // 4, self.memory + 1, (self.B,), generator=g)
        pad = (torch.arange(self.memory) >= lengths.view(-1, 1)).to(device)
        return tgt, memory, pad

    def differentiable(self, inputs):
        tgt, memory, pad = inputs
        leaves = [tgt.detach().requires_grad_(), memory.detach().requires_grad_()]
        return leaves, (*leaves, pad)

    def flops(self, _) -> float:
        d, t, m = self.d_model, self.B * self.tgt, self.B * self.memory
        linear = 2 * t * d * d * (4 + 2 + 2 * 4) + 2 * m * d * d * 2  # self q/k/v/o, cross q/o, FF 4x; cross k/v
        attention = 4 * t * d * (self.tgt + self.memory)
        return self.layers * (linear + attention) * (3.0 if self.mode == "fwd+bwd" else 1.0)

    def lengths_label(self, _):
        return "padded memory"


def decoder_providers(case, device, dtype):
    """Stock and patched decoders with the same weights, both in training mode."""
    from torch import nn

    import mmkernels

    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(case.d_model, case.heads, 4 * case.d_model, batch_first=True)
    stock = nn.TransformerDecoder(layer, case.layers).to(device, dtype).train()
    patched = copy.deepcopy(stock)
    mmkernels.patch(patched)
    causal = nn.Transformer.generate_square_subsequent_mask(case.tgt, device=device, dtype=dtype)

    def run(decoder):
        def call(tgt, memory, pad):
            return decoder(tgt, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=pad)

        return call

    return {"stock": run(stock), "mmkernels": run(patched)}
