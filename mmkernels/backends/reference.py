"""The reference backend: plain PyTorch, written for clarity. It is the oracle every other
backend is tested against, and the only one that builds the (Lq, Lk) score matrix."""
import functools

import torch

from mmkernels.backends.base import acc_dtype, co_attention_backward_by_two_calls, co_attention_by_two_calls, stats_shape
from mmkernels.limits import ACTIVATIONS

# Philox4x32-10, the counter-based generator of attention dropout. Every backend draws the same
# numbers (Triton's tl.philox, csrc/philox.h): for batch b, query head h, query row i and key j,
# the counter is (row, row >> 32, j >> 2, 0) with row = (b * Hq + h) * Lq + i, the key is the
# 64-bit seed, and output j & 3 of the four is the draw. A key is kept when its draw, as an
# unsigned 32-bit integer, is >= dropout_threshold(p); kept probabilities are scaled by 1 / (1 - p).
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_M32, _M16 = 0xFFFFFFFF, 0xFFFF


def _mul_hi_lo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b, a a 32-bit constant and b an int64 tensor of 32-bit values,
    from 16-bit pieces so that no intermediate leaves int64."""
    a_hi, a_lo = a >> 16, a & _M16
    b_hi, b_lo = b >> 16, b & _M16
    ll, hl, lh, hh = a_lo * b_lo, a_hi * b_lo, a_lo * b_hi, a_hi * b_hi
    mid = (ll >> 16) + (hl & _M16) + (lh & _M16)
    return hh + (hl >> 16) + (lh >> 16) + (mid >> 16), (ll & _M16) | ((mid & _M16) << 16)


def philox(seed: int, c0, c1, c2, c3, rounds: int = 10):
    """The four 32-bit outputs (int64 tensors) of Philox4x32 for counters c0..c3 and a 64-bit key."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """Draws below this (of 2**32) are dropped."""
    return min(int(p * 2**32), 2**32)


def dropout_keep(seed: torch.Tensor, B: int, H: int, Lq: int, Lk: int, p: float) -> torch.Tensor:
    """(B, H, Lq, Lk) bool: the keys attention dropout keeps, as every backend draws them."""
    device = seed.device
    row = torch.arange(B * H * Lq, device=device, dtype=torch.int64).view(-1, 1)
    quad = torch.arange((Lk + 3) // 4, device=device, dtype=torch.int64).view(1, -1)
    zero = torch.zeros_like(quad)
    outs = philox(int(seed.reshape(-1)[0]), (row & _M32) + zero, (row >> 32) + zero, quad + 0 * row, zero + 0 * row)
    draws = torch.stack(outs, dim=-1).view(B * H * Lq, -1)[:, :Lk]
    return (draws >= dropout_threshold(p)).view(B, H, Lq, Lk)


def visible_keys(q, k, kv_lengths=None, key_padding_mask=None, q_lengths=None, kv_start=None, kv_end=None, causal=False):
    """(B, 1, Lq, Lk) bool: which key each query row sees. Every rule intersects: kv_lengths and
    key_padding_mask (per batch), q_lengths (padded query rows see nothing), the per-row range
    kv_start <= j < kv_end, and the causal rule j <= i + Lk - Lq (aligned bottom-right)."""
    B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
    j = torch.arange(Lk, device=q.device).view(1, 1, Lk)
    i = torch.arange(Lq, device=q.device).view(1, Lq, 1)
    visible = torch.ones(B, Lq, Lk, dtype=torch.bool, device=q.device)
    if kv_lengths is not None:
        visible &= j < kv_lengths.view(B, 1, 1)
    if key_padding_mask is not None:
        visible &= ~key_padding_mask.view(B, 1, Lk)
    if q_lengths is not None:
        visible &= i < q_lengths.view(B, 1, 1)
    if kv_start is not None:
        visible &= j >= kv_start.view(B, Lq, 1)
    if kv_end is not None:
        visible &= j < kv_end.view(B, Lq, 1)
    if causal:
        visible &= j <= i + (Lk - Lq)
    return visible.view(B, 1, Lq, Lk)


def _expand_kv(t, heads):
    return t.repeat_interleave(heads // t.shape[1], dim=1) if t.shape[1] else t


def masked_matmul(w, x, visible):
    """sum_j where(visible[i, j], w[i, j] * x[j], 0) over the last two dims: w @ x where hidden
    pairs contribute nothing even when x holds NaN or Inf there (w is already 0 at hidden pairs).
    Dense for the finite part; pairs that meet a non-finite x are added exactly, one bad row of x
    at a time (rare: hidden padding that holds garbage, or a NaN the caller put in)."""
    finite = torch.isfinite(x)
    out = w @ torch.where(finite, x, 0)
    bad_rows = (~finite).any(-1).flatten(0, -2).any(0).nonzero().flatten().tolist()  # host sync: the oracle may
    for r in bad_rows:
        xr = torch.where(finite[..., r, :], 0, x[..., r, :]).unsqueeze(-2)  # the non-finite part of row r
        wr = w[..., r].unsqueeze(-1)
        out = out + torch.where(visible[..., r].unsqueeze(-1), wr * xr, 0)
    return out


def attention_probabilities(q, k, kv_lengths=None, key_padding_mask=None, q_lengths=None, kv_start=None, kv_end=None,
                            causal=False, scale=1.0):
    """softmax(scale q k^T) over the visible keys, in the accumulation dtype, as the plain
    composite computes it (the backward recomputes exactly these numbers); rows that see no key
    are all zero. Also returns the visibility and the log-sum-exp (+inf for those rows), the
    latter in float64 for float32 and float64 inputs."""
    acc = acc_dtype(q.dtype)
    visible = visible_keys(q, k, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal)
    scores = ((q.to(acc) @ _expand_kv(k, q.shape[1]).to(acc).transpose(-1, -2)) * scale).masked_fill(~visible, float("-inf"))
    empty = ~visible.any(-1, keepdim=True)  # no visible key: 0, not NaN; a row whose scores overflow is not empty
    probs = torch.softmax(scores.masked_fill(empty, 0), dim=-1).masked_fill(empty, 0)
    return probs, visible, softmax_stats(scores, empty.squeeze(-1), q.dtype)


def softmax_stats(scores, empty, dtype):
    """What the forward saves for the backward (see mmkernels.backends.base.stats_shape): the row
    max and the log of the row sum (float64), or for half inputs their sum, the log-sum-exp."""
    if stats_shape(dtype, ())[1] == torch.float32:
        return torch.logsumexp(scores.float(), dim=-1).masked_fill(empty, float("inf"))
    s = scores.double()
    m = s.amax(-1).masked_fill(empty, float("inf"))
    log_sum = torch.log(torch.exp(s - m.masked_fill(empty, 0).unsqueeze(-1)).sum(-1)).masked_fill(empty, 0)
    return torch.stack([m, log_sum], -1)


def _dropped(probs, q, k, dropout_p, seed):
    if not dropout_p:
        return probs
    keep = dropout_keep(seed, q.shape[0], q.shape[1], q.shape[2], k.shape[2], dropout_p)
    return probs * keep / (1 - dropout_p)


def _empty_stats(q):
    """The statistics of rows that see no key: +inf (and a log sum of 0)."""
    shape, dtype = stats_shape(q.dtype, q.shape[:3])
    stats = torch.full(shape, float("inf"), dtype=dtype, device=q.device)
    if len(shape) == 4:
        stats[..., 1] = 0.0
    return stats


def cross_attention(q, k, v, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal, dropout_p, seed, scale):
    if q.numel() == 0 or k.shape[2] == 0:  # nothing to attend with, or to: zeros
        return torch.zeros_like(q), _empty_stats(q)
    probs, visible, lse = attention_probabilities(q, k, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal, scale)
    out = masked_matmul(_dropped(probs, q, k, dropout_p, seed), _expand_kv(v, q.shape[1]).to(probs.dtype), visible)
    return torch.empty_like(q).copy_(out), lse.contiguous()


def _sum_groups(t, kv_heads):
    """(B, Hq, L, D) -> (B, Hkv, L, D): sums the query heads that share a kv head."""
    B, Hq, L, D = t.shape
    return t.view(B, kv_heads, Hq // kv_heads, L, D).sum(2)


def cross_attention_backward(grad_out, q, k, v, out, lse, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal,
                             dropout_p, seed, scale):
    """With P the probabilities and Z = P * keep / (1 - p) what multiplied V: dV = Z^T dO,
    dZ = dO V^T, dP = dZ * keep / (1 - p), dS = P * (dP - rowsum(P * dP)), dQ = scale dS K,
    dK = scale dS^T Q; GQA sums the grads of the heads that share k/v. Hidden pairs take no part."""
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    acc = acc_dtype(q.dtype)
    probs, visible, _ = attention_probabilities(q, k, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal, scale)
    do = grad_out.to(acc)
    kx, vx = _expand_kv(k, q.shape[1]).to(acc), _expand_kv(v, q.shape[1]).to(acc)
    dp = _dropped((do @ vx.transpose(-1, -2)).masked_fill(~visible, 0), q, k, dropout_p, seed)
    ds = torch.where(visible, probs * (dp - (probs * dp).sum(-1, keepdim=True)), 0)
    vis_t = visible.transpose(-1, -2)
    dq = scale * masked_matmul(ds, kx, visible)
    dk = _sum_groups(scale * masked_matmul(ds.transpose(-1, -2), q.to(acc), vis_t), k.shape[1])
    dv = _sum_groups(masked_matmul(_dropped(probs, q, k, dropout_p, seed).transpose(-1, -2), do, vis_t), k.shape[1])
    return tuple(torch.empty_like(t).copy_(g) for t, g in ((q, dq), (k, dk), (v, dv)))


def fusion_gate(features, weight, bias):
    acc = acc_dtype(features[0].dtype)
    logits = torch.cat([f.to(acc) for f in features], dim=-1) @ weight.to(acc).T
    if bias is not None:
        logits = logits + bias.to(acc)
    return torch.softmax(logits, dim=-1)


def _fuse(gate, values, concat):
    weighted = [gate[:, m : m + 1] * v.to(gate.dtype) for m, v in enumerate(values)]
    return torch.cat(weighted, dim=-1) if concat else torch.stack(weighted).sum(0)


def concat_weighted_fusion(features, weight, bias, values, concat):
    gate = fusion_gate(features, weight, bias)
    out = _fuse(gate, values or features, concat)
    return out.to(features[0].dtype), gate


def concat_weighted_fusion_backward(grad_out, features, weight, values, gate, concat):
    """Differentiates from the saved modality weights g: with dg_m = <dout_m, v_m>, the softmax
    gives dlogits = g * (dg - sum_m g_m dg_m), and the logits are concat(F) @ W^T + b."""
    acc = gate.dtype
    vals = values or features
    E = [v.shape[-1] for v in vals]
    douts = torch.split(grad_out.to(acc), E, dim=-1) if concat else [grad_out.to(acc)] * len(vals)
    dg = torch.stack([(d * v.to(acc)).sum(-1) for d, v in zip(douts, vals)], dim=-1)
    dlogits = gate * (dg - (gate * dg).sum(-1, keepdim=True))
    concat_features = torch.cat([f.to(acc) for f in features], dim=-1)
    d_concat = torch.split(dlogits @ weight.to(acc), [f.shape[-1] for f in features], dim=-1)
    grad_values = [gate[:, m : m + 1] * d for m, d in enumerate(douts)]
    grad_features = list(d_concat) if values else [a + b for a, b in zip(d_concat, grad_values)]
    fresh = lambda like, g: torch.empty(like.shape, dtype=like.dtype, device=like.device).copy_(g)
    return (
        [fresh(f, g) for g, f in zip(grad_features, features)],
        (dlogits.T @ concat_features).to(weight.dtype),
        dlogits.sum(0).to(weight.dtype),
        [fresh(v, g) for g, v in zip(grad_values, values)] if values else [],
    )


def decision_fusion(logits, weights, prob):
    acc = weights.dtype
    probs = [torch.softmax(t.to(acc), -1) if prob else t.to(acc) for t in logits]
    return sum(w * p for w, p in zip(weights, probs)).to(logits[0].dtype)


def decision_fusion_backward(grad_out, logits, weights, prob):
    """With p_m the probabilities (or the logits): d logits_m = w_m p_m (g - <g, p_m>) for
    softmax (w_m g for logits), and d w_m = sum <g, p_m>."""
    acc = weights.dtype
    g = grad_out.to(acc)
    grads, grad_weights = [], []
    for w, t in zip(weights, logits):
        p = torch.softmax(t.to(acc), -1) if prob else t.to(acc)
        gp = (g * p).sum(-1, keepdim=True)
        grad_weights.append(gp.sum())
        grads.append(torch.empty_like(t).copy_(w * (p * (g - gp) if prob else g)))
    return grads, torch.stack(grad_weights)


_FUNCTIONS = {None: lambda x: x, "relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
              "tanh": torch.tanh, "sigmoid": torch.sigmoid}
_ACTIVATIONS = [_FUNCTIONS[name] for name in ACTIVATIONS]  # by the operator's activation index


def linear_fusion(features, weights, bias, activation):
    pre = sum(f @ w.T for f, w in zip(features, weights))
    if bias is not None:
        pre = pre + bias
    out = _ACTIVATIONS[activation](pre)
    return (out, pre.new_empty(0)) if activation == 0 else (out, pre)


def _activation_derivative(x, activation):
    """d act / dx at x, written out (an op's kernel runs below autograd, so it cannot ask it)."""
    name = ACTIVATIONS[activation]
    if name == "relu":
        return (x > 0).to(x.dtype)
    if name == "gelu":  # gelu(x) = x Phi(x)
        return 0.5 * (1 + torch.erf(x / 2**0.5)) + x * torch.exp(-0.5 * x * x) / (2 * torch.pi) ** 0.5
    if name == "silu":  # silu(x) = x sigmoid(x)
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if name == "tanh":
        return 1 - torch.tanh(x) ** 2
    s = torch.sigmoid(x)
    return s * (1 - s)


def linear_fusion_backward(grad_out, features, weights, pre, activation):
    g = grad_out if activation == 0 else grad_out * _activation_derivative(pre, activation)
    return [g @ w for w in weights], [g.T @ f for f in features], g.sum(0)


def gated_fusion(x_a, x_b, weight_a, weight_b, weight_z, bias_a, bias_b, bias_z):
    affine = lambda x, w, b: x @ w.T + (b if b is not None else 0)
    h_a, h_b = torch.tanh(affine(x_a, weight_a, bias_a)), torch.tanh(affine(x_b, weight_b, bias_b))
    z = torch.sigmoid(affine(torch.cat([x_a, x_b], -1), weight_z, bias_z))
    return z * h_a + (1 - z) * h_b, h_a, h_b, z


def gated_fusion_backward(grad_out, x_a, x_b, weight_a, weight_b, weight_z, h_a, h_b, z):
    g_a = grad_out * z * (1 - h_a**2)
    g_b = grad_out * (1 - z) * (1 - h_b**2)
    g_z = grad_out * (h_a - h_b) * z * (1 - z)
    Da = x_a.shape[-1]
    return (g_a @ weight_a + g_z @ weight_z[:, :Da], g_b @ weight_b + g_z @ weight_z[:, Da:], g_a.T @ x_a, g_b.T @ x_b,
            g_z.T @ torch.cat([x_a, x_b], -1), g_a.sum(0), g_b.sum(0), g_z.sum(0))


co_attention = functools.partial(co_attention_by_two_calls, cross_attention)
co_attention_backward = functools.partial(co_attention_backward_by_two_calls, cross_attention_backward)


def gated_residual_linear(x, h, weight, bias, gate, row_mask):
    proj = h @ weight.T + (bias if bias is not None else 0)
    scale = torch.tanh(gate) * (row_mask.unsqueeze(1) if row_mask is not None else 1)
    return x + scale * proj, proj


def gated_residual_linear_backward(grad_out, h, weight, gate, row_mask, proj):
    mask = row_mask.unsqueeze(1) if row_mask is not None else 1
    g_proj = grad_out * torch.tanh(gate) * mask
    grad_gate = (1 - torch.tanh(gate) ** 2) * (grad_out * mask * proj).sum()
    return grad_out.clone(), g_proj @ weight, g_proj.T @ h, g_proj.sum(0), grad_gate
