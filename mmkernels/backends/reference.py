"""The reference backend: plain PyTorch, written for clarity. It is the oracle every other
backend is tested against, and the only one that builds the (Lq, Lk) score matrix."""
import functools

import torch

from mmkernels.backends.base import acc_dtype, co_attention_backward_by_two_calls, co_attention_by_two_calls


def _visible_keys(q, k, kv_lengths, key_padding_mask):
    """(B, 1, 1, Lk) bool: True where a key takes part."""
    B, Lk = q.shape[0], k.shape[2]
    visible = torch.ones(B, Lk, dtype=torch.bool, device=q.device)
    if kv_lengths is not None:
        visible &= torch.arange(Lk, device=q.device) < kv_lengths.view(B, 1)
    if key_padding_mask is not None:
        visible &= ~key_padding_mask
    return visible.view(B, 1, 1, Lk)


def _valid_queries(q, q_lengths):
    """(B, 1, Lq, 1) bool: True for real (unpadded) query rows."""
    B, Lq = q.shape[0], q.shape[2]
    if q_lengths is None:
        return torch.ones(B, 1, Lq, 1, dtype=torch.bool, device=q.device)
    return (torch.arange(Lq, device=q.device) < q_lengths.view(B, 1)).view(B, 1, Lq, 1)


def _expand_kv(t, heads):
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def attention_probabilities(q, k, kv_lengths=None, key_padding_mask=None, q_lengths=None, scale=1.0):
    """softmax(scale q k^T + mask) in the accumulation dtype, with rows that see no key (and
    padded query rows) all zero; also returns the log-sum-exp (+inf for those rows)."""
    acc = acc_dtype(q.dtype)
    kx = _expand_kv(k, q.shape[1]).to(acc)
    scores = scale * q.to(acc) @ kx.transpose(-1, -2)
    visible = _visible_keys(q, k, kv_lengths, key_padding_mask) & _valid_queries(q, q_lengths)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isneginf(lse)
    lse = lse.masked_fill(empty, float("inf"))
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return probs, lse


def cross_attention(q, k, v, kv_lengths, key_padding_mask, q_lengths, scale):
    probs, lse = attention_probabilities(q, k, kv_lengths, key_padding_mask, q_lengths, scale)
    out = probs @ _expand_kv(v, q.shape[1]).to(probs.dtype)
    return torch.empty_like(q).copy_(out), lse.contiguous()


def _sum_groups(t, kv_heads):
    """(B, Hq, L, D) -> (B, Hkv, L, D): sums the query heads that share a kv head."""
    B, Hq, L, D = t.shape
    return t.view(B, kv_heads, Hq // kv_heads, L, D).sum(2)


def cross_attention_backward(grad_out, q, k, v, out, lse, kv_lengths, key_padding_mask, q_lengths, scale):
    """With P the probabilities: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(P * dP)),
    dQ = scale dS K, dK = scale dS^T Q; GQA sums the grads of the heads that share k/v."""
    acc = acc_dtype(q.dtype)
    probs, _ = attention_probabilities(q, k, kv_lengths, key_padding_mask, q_lengths, scale)
    do = grad_out.to(acc)
    kx, vx = _expand_kv(k, q.shape[1]).to(acc), _expand_kv(v, q.shape[1]).to(acc)
    dp = do @ vx.transpose(-1, -2)
    ds = probs * (dp - (probs * dp).sum(-1, keepdim=True))
    dq = scale * ds @ kx
    dk = _sum_groups(scale * ds.transpose(-1, -2) @ q.to(acc), k.shape[1])
    dv = _sum_groups(probs.transpose(-1, -2) @ do, k.shape[1])
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


_ACTIVATIONS = (lambda x: x, torch.relu, torch.nn.functional.gelu, torch.nn.functional.silu, torch.tanh, torch.sigmoid)


def linear_fusion(features, weights, bias, activation):
    pre = sum(f @ w.T for f, w in zip(features, weights))
    if bias is not None:
        pre = pre + bias
    out = _ACTIVATIONS[activation](pre)
    return (out, pre.new_empty(0)) if activation == 0 else (out, pre)


def linear_fusion_backward(grad_out, features, weights, pre, activation):
    if activation == 0:
        g = grad_out
    else:
        with torch.enable_grad():
            x = pre.detach().requires_grad_()
            (g,) = torch.autograd.grad(_ACTIVATIONS[activation](x), x, grad_out)
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
