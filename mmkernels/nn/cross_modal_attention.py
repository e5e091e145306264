"""CrossModalAttention: a drop-in nn.MultiheadAttention whose attention runs in mmkernels."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkernels import masks
from mmkernels.ops import cross_attention
from mmkernels.ops.checks import InvalidInput

STOCK_MHA = nn.MultiheadAttention  # bound at import: tests and users may rebind torch.nn's name


class ShapeError(InvalidInput, AssertionError):
    """Bad arguments to CrossModalAttention, raised where nn.MultiheadAttention raises an
    AssertionError (with its message), so code catching either type still works."""


class CrossModalAttention(nn.Module):
    """nn.MultiheadAttention's constructor, forward, return value and parameter names
    (in_proj_weight, or q/k/v_proj_weight when kdim/vdim differ; in_proj_bias; out_proj), so a
    state_dict loads unchanged and the outputs match.

    The attention runs fused in mmkernels.cross_attention, dropout included: key_padding_mask
    (bool, or float 0/-inf) is skipped tile by tile, and an attn_mask whose rows each allow one
    contiguous span of keys (a causal mask, generate_square_subsequent_mask's float mask, image
    spans) becomes per-row key ranges, converted once per mask tensor. Only masks no range can
    express (a float bias, holes inside a row) fall back to F.scaled_dot_product_attention with
    the merged masks, which is correct but not fused; last_fallback says why.
    forward also takes kv_lengths (B,), the fast path for right-padded keys.
    need_weights=True (nn.MultiheadAttention's default) still works: the weights are computed
    by the reference path, which builds the (Lq, Lk) matrix; pass need_weights=False for speed.
    In training with dropout the returned weights are the ones before dropout. When key is
    value, their projections run as one GEMM.

    The rest of stock's contract is kept, tested by PyTorch's own MHA tests
    (tests/test_torch_contract.py): its errors and messages (ShapeError is also an
    AssertionError), add_bias_kv / add_zero_attn, merge_masks, NestedTensor inputs (stock's
    forward on these weights), TorchScript (torch's own attention math on these weights).
    """

    # What mmkernels.patch's report counts (eager calls; a compiled graph does not count). Class
    # defaults too, so a layer pickled before the counters existed still runs.
    fused_calls: int = 0
    fallback_calls: int = 0

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} and num_heads={num_heads} instead")
        if embed_dim % num_heads:
            raise ShapeError(f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, num_heads={num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:  # one more key and value row, learnt, seen by every query
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn  # one more key and value row of zeros
        self.last_fallback = None  # why the last call took the SDPA path, or None when it ran fused
        self.fused_calls = self.fallback_calls = 0
        self._reset_parameters()

    def _reset_parameters(self):  # as nn.MultiheadAttention
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        for b in (self.bias_k, self.bias_v):
            if b is not None:
                nn.init.xavier_normal_(b)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> "CrossModalAttention":
        """A CrossModalAttention with mha's configuration and a copy of its weights."""
        if not isinstance(mha, STOCK_MHA):
            raise TypeError(f"CrossModalAttention.from_module expects nn.MultiheadAttention, got {type(mha).__name__}")
        w = mha.out_proj.weight
        layer = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None,
                    add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim,
                    vdim=mha.vdim, batch_first=mha.batch_first, device=w.device, dtype=w.dtype)
        layer.load_state_dict(mha.state_dict())
        layer.train(mha.training)
        return layer

    def to_stock(self) -> nn.MultiheadAttention:
        """The nn.MultiheadAttention this layer replaces, with a copy of its weights."""
        w = self.out_proj.weight
        mha = STOCK_MHA(self.embed_dim, self.num_heads, self.dropout, bias=self.in_proj_bias is not None,
                     add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn, kdim=self.kdim,
                     vdim=self.vdim, batch_first=self.batch_first, device=w.device, dtype=w.dtype)
        mha.load_state_dict(self.state_dict())
        return mha.train(self.training)

    def _weights(self):
        E = self.embed_dim
        if self._qkv_same_embed_dim:
            return self.in_proj_weight[:E], self.in_proj_weight[E : 2 * E], self.in_proj_weight[2 * E :]
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _project(self, query, key, value):
        E = self.embed_dim
        wq, wk, wv = self._weights()
        b = self.in_proj_bias
        if b is not None and b.dtype != query.dtype:
            b = b.to(query.dtype)  # stock accepts a bias of another dtype
        bq, bkv = (b[:E], b[E:]) if b is not None else (None, None)
        q = F.linear(query, wq, bq)
        if key is value and self.kdim == self.vdim:
            w_kv = self.in_proj_weight[E:] if self._qkv_same_embed_dim else torch.cat([wk, wv])
            k, v = F.linear(key, w_kv, bkv).chunk(2, dim=-1)
        else:
            k = F.linear(key, wk, bkv[:E] if bkv is not None else None)
            v = F.linear(value, wv, bkv[E:] if bkv is not None else None)
        return q, k, v

    def _heads(self, x):
        """(B, L, E) or (L, B, E) -> a (B, H, L, Dh) view, no copy."""
        if self.batch_first:
            B, L, _ = x.shape
            return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        L, B, _ = x.shape
        return x.view(L, B, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False, kv_lengths: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        if torch.jit.is_scripting():
            # TorchScript cannot call the Python op layer: a scripted layer runs torch's own
            # multi_head_attention_forward on this layer's weights.
            return self._scripted_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                          average_attn_weights, is_causal, kv_lengths)
        return self._fused_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal, kv_lengths)

    def _scripted_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                          need_weights: bool, attn_mask: Optional[Tensor], average_attn_weights: bool,
                          is_causal: bool, kv_lengths: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        batched = query.dim() == 3
        if kv_lengths is not None:
            lengths_mask = _lengths_mask(kv_lengths, key.shape[1] if self.batch_first and batched else key.shape[0])
            if not batched:
                lengths_mask = lengths_mask.view(-1)
            key_padding_mask = lengths_mask if key_padding_mask is None else key_padding_mask.logical_or(lengths_mask)
        if self.batch_first and batched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=not self._qkv_same_embed_dim,
            q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        return out, weights

    @torch.jit.unused
    def _fused_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                       need_weights: bool, attn_mask: Optional[Tensor], average_attn_weights: bool,
                       is_causal: bool, kv_lengths: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        if query.is_nested or key.is_nested or value.is_nested:
            # stock's NestedTensor contract, on these weights: its fused fast path, or its error
            return STOCK_MHA.forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                  average_attn_weights, is_causal)
        trusted_causal = is_causal and attn_mask is not None and key_padding_mask is None and not need_weights
        unbatched = not self._check_inputs(query, key, value, key_padding_mask, attn_mask, kv_lengths, trusted_causal)
        if unbatched:
            dim = 0 if self.batch_first else 1
            query, key, value = (t.unsqueeze(dim) for t in (query, key, value))
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
            kv_lengths = kv_lengths.view(1) if kv_lengths is not None else None
        merged, q, k, used_masks = self._attend(query, key, value, key_padding_mask, attn_mask, is_causal, kv_lengths, need_weights)
        out = self.out_proj(merged)
        weights = None
        if need_weights:
            weights = self._attention_weights(q, k, *used_masks, is_causal, average_attn_weights)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask, kv_lengths, trusted_causal=False) -> bool:
        """nn.MultiheadAttention's checks, with its messages; True for batched inputs.
        trusted_causal: stock drops the attn_mask for the is_causal hint (see _fused_arguments)
        before it checks the mask's shape, so then its shape is not checked."""
        try:
            batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        except AssertionError as e:
            raise ShapeError(str(e)) from None
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
                raise ShapeError(f"only bool and floating types of {name} are supported")
        if query.shape[-1] != self.embed_dim:
            raise ShapeError(f"was expecting embedding dimension of {self.embed_dim}, but got {query.shape[-1]}")
        for name, t, d in (("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != d:
                raise ShapeError(f"expected `{name}` with last dim {d} (the layer's {name[0]}dim), got shape {tuple(t.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ShapeError(f"key's sequence and batch dims {tuple(key.shape[:-1])} do not match value's {tuple(value.shape[:-1])}")
        b_dim = (0 if self.batch_first else 1) if batched else None
        B = query.shape[b_dim] if batched else 1
        Lq = query.shape[1 if self.batch_first else 0] if batched else query.shape[0]
        Lk = key.shape[1 if self.batch_first else 0] if batched else key.shape[0]
        if batched and key.shape[b_dim] != B:
            raise ShapeError(f"expected `key` and `query` to have the same batch size, got {key.shape[b_dim]} and {B}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != ((B, Lk) if batched else (Lk,)):
            raise ShapeError(f"expecting key_padding_mask shape of {(B, Lk) if batched else (Lk,)}, but got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None and not trusted_causal:
            expected = (Lq, Lk) if attn_mask.dim() == 2 else (B * self.num_heads, Lq, Lk)
            if tuple(attn_mask.shape) != expected:
                raise ShapeError(f"The shape of the {attn_mask.dim()}D attn_mask is {tuple(attn_mask.shape)}, but should be {expected}.")
        if kv_lengths is not None and tuple(kv_lengths.shape) != ((B,) if batched else (1,)):
            raise ShapeError(f"kv_lengths must have shape {(B,)}, got {tuple(kv_lengths.shape)}")
        return batched

    def attend(self, query, key, value, key_padding_mask=None, attn_mask=None, is_causal=False, kv_lengths=None,
               need_weights=False):
        """The attention with its heads merged, before out_proj, in the query's layout; also
        the (B, H, L, Dh) q and k views. GatedCrossAttention fuses out_proj into its epilogue."""
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ShapeError(f"CrossModalAttention: query must be ({'B, L' if self.batch_first else 'L, B'}, {self.embed_dim}), got {tuple(query.shape)}")
        for name, t, d in (("key", key, self.kdim), ("value", value, self.vdim)):
            if t.dim() != 3 or t.shape[-1] != d:
                raise ShapeError(f"CrossModalAttention: {name} must be 3-D with last dim {d}, got {tuple(t.shape)}")
        merged, q, k, _ = self._attend(query, key, value, key_padding_mask, attn_mask, is_causal, kv_lengths, need_weights)
        return merged, q, k

    def _attend(self, query, key, value, key_padding_mask, attn_mask, is_causal, kv_lengths, need_weights):
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                               "`generate_square_subsequent_mask` to create this mask.")
        q, k, v = (self._heads(t) for t in self._project(query, key, value))
        if self.bias_k is not None or self.add_zero_attn:
            k, v, key_padding_mask, attn_mask = self._extra_keys(k, v, key_padding_mask, attn_mask, kv_lengths)
            kv_lengths = None  # folded into key_padding_mask, which the extra keys extend
        dropout = self.dropout if self.training else 0.0
        fused, self.last_fallback = self._fused_arguments(q, k, key_padding_mask, attn_mask, is_causal, kv_lengths, need_weights)
        if not torch.compiler.is_compiling():
            if fused is None:
                self.fallback_calls += 1
            else:
                self.fused_calls += 1
        if fused is not None:
            out = cross_attention(q, k, v, dropout_p=dropout, **fused)
        else:
            mask = _additive_mask(q, k, key_padding_mask, attn_mask, kv_lengths, is_causal)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        B, _, Lq, _ = q.shape
        merged = out.transpose(1, 2).reshape(B, Lq, self.embed_dim)
        return (merged if self.batch_first else merged.transpose(0, 1)), q, k, (key_padding_mask, attn_mask, kv_lengths)

    def _extra_keys(self, k, v, key_padding_mask, attn_mask, kv_lengths):
        """add_bias_kv's learnt key/value row, then add_zero_attn's zero row, after the keys, as
        stock appends them; every query sees them, so the masks grow by visible columns."""
        B, H, Lk, Dh = k.shape
        if kv_lengths is not None:
            lengths_mask = _lengths_mask(kv_lengths, Lk)
            if key_padding_mask is None:
                key_padding_mask = lengths_mask
            elif key_padding_mask.dtype == torch.bool:
                key_padding_mask = key_padding_mask | lengths_mask
            else:
                key_padding_mask = key_padding_mask.masked_fill(lengths_mask, float("-inf"))
        rows_k, rows_v = [k], [v]
        if self.bias_k is not None:
            rows_k.append(self.bias_k.to(k.dtype).view(1, H, 1, Dh).expand(B, H, 1, Dh))
            rows_v.append(self.bias_v.to(v.dtype).view(1, H, 1, Dh).expand(B, H, 1, Dh))
        if self.add_zero_attn:
            rows_k.append(k.new_zeros(B, H, 1, Dh))
            rows_v.append(v.new_zeros(B, H, 1, Dh))
        extra = len(rows_k) - 1
        k, v = torch.cat(rows_k, 2), torch.cat(rows_v, 2)
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, extra))  # False / 0: visible
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, extra))
        return k, v, key_padding_mask, attn_mask

    def _fused_arguments(self, q, k, key_padding_mask, attn_mask, is_causal, kv_lengths, need_weights):
        """The cross_attention keywords for these masks, or (None, why the fallback runs): masks
        become kv_lengths, a bool key_padding_mask and per-row key ranges (a causal mask is a
        range per row); only biases and masks with holes inside a row need SDPA."""
        B, _, Lq, _ = q.shape
        Lk = k.shape[2]
        args = {"kv_lengths": kv_lengths}
        if key_padding_mask is not None:
            if key_padding_mask.is_floating_point() and torch.compiler.is_compiling():
                return None, "a float key_padding_mask inside torch.compile (telling 0/-inf from a bias needs its values)"
            visible = masks.SHARED.visible(key_padding_mask, bool_true_means="hidden")
            if visible is None:
                return None, "a float key_padding_mask with values other than 0 and -inf"
            args["key_padding_mask"] = ~visible
        if attn_mask is None:
            return args, None
        if is_causal and key_padding_mask is None and not need_weights:
            # stock trusts the hint and runs SDPA's is_causal (aligned top-left): row i sees j <= i
            end = torch.arange(1, Lq + 1, device=q.device).clamp(max=Lk).expand(B, Lq)
            return dict(args, kv_end=end), None
        ranges, why = masks.SHARED(attn_mask, B, Lq, Lk, bool_true_means="hidden")
        if ranges is None:
            return None, f"attn_mask: {why}"
        start, end, hidden = ranges
        if hidden is not None:
            kpm = args.get("key_padding_mask")
            args["key_padding_mask"] = hidden if kpm is None else kpm | hidden
        return dict(args, kv_start=start, kv_end=end), None

    def merge_masks(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                    query: Tensor) -> Tuple[Optional[Tensor], Optional[int]]:
        """nn.MultiheadAttention.merge_masks: torch's TransformerEncoderLayer fast path (eval,
        no grad, batch_first) calls it, then runs its own fused kernel on this layer's weights.
        Returns (mask, mask_type): (None, None); (key_padding_mask, 1); or the attn_mask as
        (B, H, L, L), plus the key padding, (…, 2). Annotated: TorchScript compiles it inside a
        scripted encoder layer."""
        if attn_mask is None:
            if key_padding_mask is None:
                return None, None
            return key_padding_mask, 1
        B, L, _ = query.shape
        if attn_mask.dim() == 3:
            merged = attn_mask.view(B, -1, L, L)
        else:
            merged = attn_mask.view(1, 1, L, L).expand(B, self.num_heads, L, L)
        if key_padding_mask is not None:
            merged = merged + key_padding_mask.view(B, 1, 1, L).expand(B, self.num_heads, 1, L)
        return merged, 2

    def _attention_weights(self, q, k, key_padding_mask, attn_mask, kv_lengths, is_causal, average):
        """nn.MultiheadAttention's weights, in q's dtype computed at least in float32."""
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * self.head_dim ** -0.5
        probs = torch.softmax(scores + _additive_mask(q, k, key_padding_mask, attn_mask, kv_lengths, is_causal).to(acc), -1)
        probs = probs.to(q.dtype)
        return probs.mean(1) if average else probs


def _lengths_mask(kv_lengths: Tensor, kv_len: int) -> Tensor:
    """(B, kv_len) bool, True = hidden: the keys at or past each batch element's length."""
    return torch.arange(kv_len, device=kv_lengths.device) >= kv_lengths.view(-1, 1)


def _additive_mask(q, k, key_padding_mask, attn_mask, kv_lengths, is_causal):
    """nn.MultiheadAttention's masks (bool True = not allowed, or float added to the scores)
    merged into one float mask of shape (B, H, Lq, Lk) for the fallback path."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    mask = torch.zeros(B, H, Lq, Lk, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)

    def add(m):
        nonlocal mask
        mask = mask.masked_fill(m, float("-inf")) if m.dtype == torch.bool else mask + m.to(mask.dtype)

    if key_padding_mask is not None:
        add(key_padding_mask.view(B, 1, 1, Lk))
    if kv_lengths is not None:
        add(_lengths_mask(kv_lengths, Lk).view(B, 1, 1, Lk))
    if attn_mask is not None:
        add(attn_mask.view(B, H, Lq, Lk) if attn_mask.dim() == 3 else attn_mask)
    return mask.to(q.dtype)
