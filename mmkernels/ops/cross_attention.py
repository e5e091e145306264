"""cross_attention: the public function, the operator's router, its fake and its autograd."""
import torch

from mmkernels.backends.base import Problem, acc_dtype
from mmkernels.ops._register import register_op
from mmkernels.ops._checks import (
    check_float,
    check_index,
    check_index_values,
    check_last_dim_contiguous,
    check_like,
    fail,
)


def cross_attention(q, k, v, *, kv_lengths=None, key_padding_mask=None, q_lengths=None, scale=None, backend=None):
    """Attention of queries from one modality over keys/values of another.

    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D) with Hq % Hkv == 0 (grouped-query attention, no
    copy of k/v). Any strides with a contiguous last dim: a (B, L, H, D) tensor viewed with
    .transpose(1, 2) is taken as it is, and the output comes back in q's layout.

    kv_lengths: int (B,), keys j >= kv_lengths[b] are padding (the fast path: padded key tiles
    are skipped). key_padding_mask: bool (B, Lk), True = ignore the key (nn.MultiheadAttention's
    convention). q_lengths: int (B,), query rows i >= q_lengths[b] are padding. A query row that
    sees no key, and every padded query row, outputs exactly 0 and passes no gradient.

    scale defaults to D ** -0.5; the softmax runs in fp32 (fp64 for fp64 inputs). backend: None
    (use_backend / MMKERNELS_BACKEND / auto) or one of mmkernels.available_backends().
    Returns (B, Hq, Lq, D) in q's dtype.
    """
    check_attention_inputs(q, k, v, kv_lengths, key_padding_mask, q_lengths)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = torch.ops.mmkernels.cross_attention(
        q, k, v, kv_lengths, key_padding_mask, q_lengths, scale, backend or ""
    )
    return out


def check_attention_inputs(q, k, v, kv_lengths, key_padding_mask, q_lengths,
                           names=("q", "k", "v", "kv_lengths", "key_padding_mask", "q_lengths")):
    nq, nk, nv, nkv, nmask, nql = names
    check_float(nq, q)
    check_like(nk, k, nq, q)
    check_like(nv, v, nq, q)
    for name, t in ((nq, q), (nk, k), (nv, v)):
        if t.dim() != 4:
            fail(f"{name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
        check_last_dim_contiguous(name, t)
    B, Hq, _, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        fail(f"{nk} must be (B={B}, Hkv, Lk, D={D}) to match {nq}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        fail(f"{nv} must have {nk}'s shape {tuple(k.shape)}, got {tuple(v.shape)}")
    Hkv, Lk = k.shape[1], k.shape[2]
    if (Hkv == 0 and Hq != 0) or (Hkv and Hq % Hkv):
        fail(f"{nq}'s heads must be a multiple of {nk}'s heads (grouped-query attention), got Hq={Hq}, Hkv={Hkv}")
    check_index(nkv, kv_lengths, nq, q, B)
    check_index(nql, q_lengths, nq, q, B)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool or key_padding_mask.device != q.device:
            got = f"{key_padding_mask.dtype} on {key_padding_mask.device}" if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
            fail(f"{nmask} must be bool on {nq}'s device ({q.device}), got {got}")
        if tuple(key_padding_mask.shape) != (B, Lk):
            fail(f"{nmask} must have shape (B, Lk) = ({B}, {Lk}), got {tuple(key_padding_mask.shape)}")


def _problem(q, k, v, *rest):
    return Problem.of("cross_attention", q, k, v, head_dim=q.shape[-1])


def _check_values(q, k, v, kv_lengths, key_padding_mask, q_lengths, scale):
    check_index_values("kv_lengths", kv_lengths, k.shape[2])
    check_index_values("q_lengths", q_lengths, q.shape[2])


def _fake_forward(q, k, v, *rest):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=acc_dtype(q.dtype))


def _fake_backward(grad_out, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_lengths, key_padding_mask, q_lengths, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_lengths, key_padding_mask, q_lengths)
    ctx.scale, ctx.backend = scale, backend


def _autograd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_lengths, key_padding_mask, q_lengths = ctx.saved_tensors
    if grad_out.stride(-1) != 1:  # e.g. the expanded gradient of out.sum()
        grad_out = grad_out.contiguous()
    dq, dk, dv = torch.ops.mmkernels.cross_attention_backward(
        grad_out, q, k, v, out, lse, kv_lengths, key_padding_mask, q_lengths, ctx.scale, ctx.backend
    )
    return dq, dk, dv, None, None, None, None, None


register_op("cross_attention", problem=_problem, check=_check_values, fake=_fake_forward, backward_fake=_fake_backward,
            setup_context=_setup_context, backward=_autograd_backward)
