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
    return open_gates(MllamaCrossAttentionDecoderLayer(config, layer_idx=0).to(device_type, dtype).eval())


def open_gates(model):
    """Mllama's cross-attention gates set non-zero: they start at 0, which makes the layers no-ops."""
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(0.8)
                layer.cross_attn_mlp_gate.fill_(0.5)
    return model


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


@dataclasses.dataclass
class MhaLayerCase:
    """nn.MultiheadAttention against CrossModalAttention.from_module of it (the same weights),
    in eval under no_grad, as a decoding step of a served model calls it: per-call overhead is
    the cost at Lq 1."""

    E: int
    H: int
    Lq: int
    Lk: int
    B: int = 1
    mode: str = "fwd"
    memory_only: bool = False

    op = "mha_layer"

    @staticmethod
    def peers(case, device, dtype, full):
        from torch import nn

        from mmkernels.nn import CrossModalAttention

        torch.manual_seed(0)
        stock = nn.MultiheadAttention(case.E, case.H, batch_first=True).to(device, dtype).eval()
        ours = CrossModalAttention.from_module(stock).to(device, dtype).eval()

        def run(layer):
            def call(query, memory):
                with torch.no_grad():
                    return layer(query, memory, memory, need_weights=False)[0]

            return call

        return {"stock": run(stock), "mmkernels": run(ours)}

    @property
    def shape(self):
        return f"B{self.B} E{self.E} H{self.H} Lq{self.Lq} Lk{self.Lk}"

    def inputs(self, device, dtype):
        g = torch.Generator().manual_seed(0)
        return (torch.randn(self.B, self.Lq, self.E, generator=g).to(device, dtype),
                torch.randn(self.B, self.Lk, self.E, generator=g).to(device, dtype))

    def flops(self, _) -> float:
        return 2 * self.B * self.E * self.E * (2 * self.Lq + 2 * self.Lk) + 4 * self.B * self.Lq * self.Lk * self.E


GENERATE_SIZES = {
    "tiny": dict(hidden=64, heads=4, kv_heads=2, ffn=96, layers=4, cross=[1, 3], prompt=12, image_tokens=20, vocab=128),
    "small": dict(hidden=512, heads=8, kv_heads=2, ffn=1536, layers=4, cross=[1, 3], prompt=64, image_tokens=577, vocab=2048),
}


@dataclasses.dataclass
class GenerateCase:
    """Greedy generation with a small Mllama text model (self-attention with a KV cache, and
    cross-attention to one image), transformers' generate(): attn_implementation "sdpa" against
    "mmkernels". The time is per generated token (the prompt's prefill included, over `tokens`);
    the generated tokens must be identical."""

    size: str
    tokens: int = 16
    mode: str = "fwd"
    memory_only: bool = False
    padded: bool = False  # a batch of two prompts, the second left-padded: every step gets a mask
    op = "generate"

    @staticmethod
    def peers(case, device, dtype, full):
        models = {impl: _generation_model(case.size, device.type, dtype, impl) for impl in ("sdpa", "mmkernels")}

        def run(model):
            def call(ids, images, attention_mask):
                out = model.generate(input_ids=ids, cross_attention_states=images, attention_mask=attention_mask,
                                     max_new_tokens=case.tokens, min_new_tokens=case.tokens, do_sample=False)
                return out[:, ids.shape[1]:].float()

            return call

        return {"transformers-sdpa": run(models["sdpa"]), "mmkernels": run(models["mmkernels"])}

    @property
    def B(self):
        return 2 if self.padded else 1

    @property
    def shape(self):
        s = GENERATE_SIZES[self.size]
        batch = "B2 left-padded " if self.padded else ""
        return f"{self.size} hidden{s['hidden']} H{s['heads']}/{s['kv_heads']} {batch}prompt{s['prompt']} image{s['image_tokens']} +{self.tokens} tokens"

    def inputs(self, device, dtype):
        s = GENERATE_SIZES[self.size]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, s["vocab"], (self.B, s["prompt"]), generator=g)
        mask = torch.ones(self.B, s["prompt"], dtype=torch.long)
        if self.padded:
            ids[1, : s["prompt"] // 4], mask[1, : s["prompt"] // 4] = 0, 0  # pad token 0
        images = torch.randn(self.B, s["image_tokens"], s["hidden"], generator=g).to(device, dtype)
        return ids.to(device), images, mask.to(device)  # no cross-attention mask: every token sees the image

    def flops(self, _) -> float:
        s = GENERATE_SIZES[self.size]
        per_token = 2 * s["layers"] * (4 * s["hidden"] ** 2 + 3 * s["hidden"] * s["ffn"]) + 2 * s["hidden"] * s["vocab"]
        return per_token * (s["prompt"] + self.tokens) * self.B


@functools.cache
def _generation_model(size, device_type, dtype, implementation):
    from transformers import MllamaForCausalLM, MllamaTextConfig

    import mmkernels.integrations.transformers as mmt

    mmt.register()
    s = GENERATE_SIZES[size]
    config = MllamaTextConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_attention_heads=s["heads"],
                              num_key_value_heads=s["kv_heads"], intermediate_size=s["ffn"], num_hidden_layers=s["layers"],
                              cross_attention_layers=s["cross"], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = open_gates(MllamaForCausalLM._from_config(config, attn_implementation=implementation).to(device_type, dtype).eval())
    for module in model.modules():
        if type(module).__name__ == "MllamaTextCrossAttention":
            # Mllama's cross-attention has no is_causal attribute, and transformers' sdpa path takes
            # a missing one as True: without a cross-attention mask it would make the prefill's
            # image attention causal. Real calls pass a mask; here both sides attend as they do.
            module.is_causal = False
    return model
