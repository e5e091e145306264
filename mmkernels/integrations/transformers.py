"""Hugging Face transformers: attn_implementation="mmkernels".

    import mmkernels.integrations.transformers as mmt
    mmt.register()
    model = AutoModel.from_config(config, attn_implementation="mmkernels")

Registers an attention function and a mask function under "mmkernels" in transformers'
AttentionInterface / AttentionMaskInterface. The attention function runs
mmkernels.cross_attention (grouped-query heads without repeat_kv) when the call is one it can
take: a cross-attention module (class name containing "CrossAttention", is_cross_attention=True,
or is_causal=False),
never treated as causal, with either no mask or a 4-D mask that is the same for every query row,
which is a key-padding mask. Everything else (causal self-attention, masks that differ per query
row, dropout while training, softcap, position bias) goes to transformers' own sdpa function,
so the numbers are always right and the fast path is taken where it is valid.
"""
import torch

from mmkernels.ops import cross_attention

NAME = "mmkernels"


def _is_cross_attention(module) -> bool:
    """Mllama's cross layers are *CrossAttention classes, IDEFICS marks them is_cross_attention
    (on a class whose is_causal is True), BLIP-2's Q-Former says is_causal=False."""
    return ("CrossAttention" in type(module).__name__ or getattr(module, "is_cross_attention", False)
            or getattr(module, "is_causal", None) is False)


def _key_padding(mask: torch.Tensor, batch: int, q_len: int, kv_len: int):
    """(B, 1|H, Lq, Lk) bool (True = attend) or additive float mask -> (B, Lk) bool with
    True = ignore, or None when the mask is not a key-padding mask."""
    if mask.dim() != 4 or mask.shape[0] != batch or mask.shape[-1] != kv_len:
        return None
    if mask.dtype == torch.bool:
        visible = mask
    else:
        hidden = mask <= torch.finfo(mask.dtype).min / 2
        if not (hidden | (mask == 0)).all():  # a bias, not just a mask
            return None
        visible = ~hidden
    visible = visible.expand(batch, visible.shape[1], q_len, kv_len)
    if not (visible == visible[:, :1, :1, :]).all():  # differs per query row or head
        return None
    return ~visible[:, 0, 0, :]


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature; returns ((B, Lq, H, D) output, None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cross = _is_cross_attention(module)
    causal = False if cross else (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    B, _, Lq, _ = query.shape
    key_padding_mask = None
    usable = dropout == 0.0 and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
    if usable and attention_mask is not None:
        key_padding_mask = _key_padding(attention_mask, B, Lq, key.shape[2])
        usable = key_padding_mask is not None
    if usable and causal and Lq > 1 and attention_mask is None:
        usable = False
    if not usable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=False if cross else is_causal, **kwargs)
    out = cross_attention(query, key, value, key_padding_mask=key_padding_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Makes attn_implementation="mmkernels" available; the mask is built as for "sdpa"."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
