"""Hugging Face transformers: attn_implementation="mmkernels".

    import mmkernels.integrations.transformers as mmt
    mmt.register()
    model = AutoModel.from_config(config, attn_implementation="mmkernels")

Registers an attention function and a mask function under "mmkernels" in transformers'
AttentionInterface / AttentionMaskInterface; the masks are built as for "sdpa". The attention
function runs mmkernels.cross_attention (grouped-query heads without repeat_kv, dropout fused)
whenever the mask says, row by row, "one contiguous span of keys": the shape of cross-attention
masks (Llama 3.2 Vision's image intervals with their BOS row and padded tiles, IDEFICS, BLIP-2's
padded image tokens) and of causal masks with padding. The mask becomes per-row kv_start/kv_end
(plus a key_padding_mask for keys no row sees) once per mask tensor, not once per layer (a small
cache). A mask whose rows take a few distinct patterns (vision encoders that pad patches and
queries together, as Mllama's does) runs one fused call per pattern, the other rows' ranges
empty, and their outputs summed. Causal self-attention without a mask runs the causal kernel. Only what no range can
express (a bias, holes inside a row, per-head differences, softcap, position bias) goes to
transformers' own sdpa function, and the reason is logged once at debug level. Inside
torch.compile the mask's values cannot decide anything while tracing: its ranges are computed on
the device, and torch.cond runs the fused call where they express the mask exactly, sdpa where
not (with dropout, which torch.cond cannot branch over, sdpa).
"""
import logging
import sys

import torch

from mmkernels.masks import SHARED, traced_ranges
from mmkernels.ops import cross_attention

NAME = "mmkernels"
log = logging.getLogger("mmkernels.integrations.transformers")
_logged: set = set()


def pretrained_models(model) -> list:
    """The outermost transformers PreTrainedModels in `model` (itself, or inside a wrapper);
    none when transformers was never imported (then there can be none)."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return []
    if isinstance(model, transformers.PreTrainedModel):
        return [model]
    return [m for child in model.children() for m in pretrained_models(child)]


def _is_cross_attention(module) -> bool:
    """Mllama's cross layers are *CrossAttention classes, IDEFICS marks them is_cross_attention
    (on a class whose is_causal is True), BLIP-2's Q-Former says is_causal=False."""
    return ("CrossAttention" in type(module).__name__ or getattr(module, "is_cross_attention", False)
            or getattr(module, "is_causal", None) is False)


def _fallback(reason: str):
    if reason not in _logged:
        _logged.add(reason)
        log.debug("mmkernels attention falls back to sdpa: %s", reason)


def fused_arguments(module, query, key, attention_mask, dropout, is_causal, kwargs):
    """The cross_attention keywords that reproduce transformers' sdpa call, or (None, why not)."""
    cross = _is_cross_attention(module)
    causal = False if cross else (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    B, _, Lq, _ = query.shape
    Lk = key.shape[2]
    if kwargs.get("softcap") is not None:
        return None, "softcap"
    if kwargs.get("position_bias") is not None:
        return None, "a position bias"
    if attention_mask is None:
        if causal and Lq > 1 and Lq != Lk:  # sdpa's is_causal aligns top-left there, ours bottom-right
            return None, "causal attention without a mask and Lq != Lk"
        return dict(causal=bool(causal and Lq > 1), dropout_p=dropout), None
    if attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, :Lk]  # as sdpa does: static caches make longer masks
    if torch.compiler.is_compiling():
        if dropout:
            return None, "a mask inside torch.compile with dropout (torch.cond cannot branch over random draws)"
        traced, why = traced_ranges(attention_mask, B, Lq, Lk, bool_true_means="visible")
        if traced is None:
            return None, why
        start, end, hidden, exact = traced
        return dict(kv_start=start, kv_end=end, key_padding_mask=hidden, exact=exact), None
    ranges, why = SHARED(attention_mask, B, Lq, Lk, bool_true_means="visible")
    if ranges is None:
        calls, why_not = SHARED.classes(attention_mask, B, Lq, Lk, bool_true_means="visible")
        if calls is None:
            return None, why if why_not == why else f"{why}, and {why_not}"
        parts = [dict(kv_start=start, kv_end=end, key_padding_mask=hidden) for start, end, hidden in calls]
        return dict(parts=parts, dropout_p=dropout), None
    start, end, hidden = ranges
    return dict(kv_start=start, kv_end=end, key_padding_mask=hidden, dropout_p=dropout), None


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature; returns ((B, Lq, H, D) output, None)."""
    args, why = fused_arguments(module, query, key, attention_mask, dropout, is_causal, kwargs)
    if args is None:
        _fallback(why)
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs), None
    exact = args.pop("exact", None)
    if exact is None:
        return _fused(query, key, value, scaling, args), None
    # Inside torch.compile: whether the ranges express the mask is a device value, so the graph
    # holds both calls and torch.cond runs one.
    fused = lambda q, k, v, start, end, hidden: _fused(q, k, v, scaling, dict(kv_start=start, kv_end=end, key_padding_mask=hidden))
    stock = lambda q, k, v, start, end, hidden: _sdpa(module, q, k, v, attention_mask, 0.0, scaling, is_causal, kwargs)
    return torch.cond(exact, fused, stock, (query, key, value, args["kv_start"], args["kv_end"], args["key_padding_mask"])), None


def _fused(query, key, value, scaling, args):
    parts = args.pop("parts", None)
    if parts is None:
        out = cross_attention(query, key, value, scale=scaling, **args)
    else:  # one call per pattern of rows (masks.row_classes): each row's output comes from one of them
        out = sum(cross_attention(query, key, value, scale=scaling, **part, **args) for part in parts)
    return out.transpose(1, 2).contiguous()


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cross = _is_cross_attention(module)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=False if cross else is_causal, **kwargs)[0]


def register() -> None:
    """Makes attn_implementation="mmkernels" available; the mask is built as for "sdpa"."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
