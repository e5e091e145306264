"""cross_attention: the public function, the operator's router, its fake and its autograd."""
import math
import numbers

import torch
from torch import Tensor

from mmkernels.backends import native, reference
from mmkernels.backends import triton as triton_backend
from mmkernels.backends.base import Problem, stats_shape
from mmkernels.limits import CUDA_ATTENTION_HEAD_DIMS, TRITON_MAX_HEAD_DIM
from mmkernels.ops.checks import (
    check_float,
    check_index,
    check_index_values,
    check_last_dim_contiguous,
    check_like,
    check_rows_index,
    check_shape,
    fail,
)
from mmkernels.ops.registration import autocasts, register_op
from mmkernels.spec import HALVES, HALVES_AND_FLOAT32, Capability, OpSpec


@autocasts()
def cross_attention(q: Tensor, k: Tensor, v: Tensor, *, kv_lengths: Tensor | None = None,
                    key_padding_mask: Tensor | None = None, q_lengths: Tensor | None = None, kv_start: Tensor | None = None,
                    kv_end: Tensor | None = None, causal: bool = False, dropout_p: float = 0.0,
                    scale: float | Tensor | None = None, backend: str | None = None) -> Tensor:
    """Attention of queries from one modality over keys/values of another.

    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D) with Hq % Hkv == 0 (grouped-query attention, no
    copy of k/v). Any strides with a contiguous last dim: a (B, L, H, D) tensor viewed with
    .transpose(1, 2) is taken as it is, and the output comes back in q's layout.

    Which keys a query row i of batch b sees; every rule given intersects:
      kv_lengths: int (B,), keys j >= kv_lengths[b] are padding (right padding);
      key_padding_mask: bool (B, Lk), True = ignore the key (nn.MultiheadAttention's convention);
      q_lengths: int (B,), query rows i >= q_lengths[b] are padding and see nothing;
      kv_start, kv_end: int (B, Lq), row i sees kv_start[b, i] <= j < kv_end[b, i] (a missing
        start is 0, a missing end Lk; values are clamped to [0, Lk]; start >= end is empty):
        one contiguous span of keys per row, the shape of real multimodal masks (a text token
        sees the image it follows);
      causal: j <= i + Lk - Lq (aligned bottom-right, as flash-attn).
    Work is proportional to the keys a block of queries can see: key tiles that no row of a
    block sees are never loaded. A row that sees no key outputs exactly 0 and passes no
    gradient; hidden keys never influence anything, whatever they hold (NaN, Inf, garbage).

    dropout_p: attention dropout (applied whenever > 0: pass 0 in eval), drawn by counter-based
    Philox from torch's generator, so torch.manual_seed reproduces it; the backward regenerates
    the same mask. scale: D ** -0.5 by default; a float, or a tensor (a learnable temperature
    gets its gradient). The softmax runs in fp32 (fp64 for fp64 inputs). backend: None
    (use_backend / MMKERNELS_BACKEND / auto) or one of mmkernels.available_backends().
    Returns (B, Hq, Lq, D) in q's dtype.
    """
    check_float("q", q)  # the rest is checked once, by the operator (or its kernel)
    if q.dim() != 4:
        fail(f"q must be 4-D (B, H, L, D), got shape {tuple(q.shape)}")
    q, scale = apply_scale(q, scale)
    causal, dropout_p = check_causal(causal), check_dropout(dropout_p)
    seed = dropout_seed(q) if dropout_p > 0 else None
    out, _ = _op(q, k, v, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal, dropout_p, seed, scale, backend=backend)
    return out


def check_attention_inputs(q, k, v, kv_lengths, key_padding_mask, q_lengths, kv_start=None, kv_end=None,
                           names=("q", "k", "v", "kv_lengths", "key_padding_mask", "q_lengths", "kv_start", "kv_end")):
    nq, nk, nv, nkv, nmask, nql, nstart, nend = names
    check_float(nq, q)
    check_like(nk, k, nq, q)
    check_like(nv, v, nq, q)
    for name, t in ((nq, q), (nk, k), (nv, v)):
        if t.dim() != 4:
            fail(f"{name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
        check_last_dim_contiguous(name, t)
    B, Hq, Lq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        fail(f"{nk} must be (B={B}, Hkv, Lk, D={D}) to match {nq}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        fail(f"{nv} must have {nk}'s shape {tuple(k.shape)}, got {tuple(v.shape)}")
    Hkv, Lk = k.shape[1], k.shape[2]
    if (Hkv == 0 and Hq != 0) or (Hkv and Hq % Hkv):
        fail(f"{nq}'s heads must be a multiple of {nk}'s heads (grouped-query attention), got Hq={Hq}, Hkv={Hkv}")
    check_index(nkv, kv_lengths, nq, q, B)
    check_index(nql, q_lengths, nq, q, B)
    check_rows_index(nstart, kv_start, nq, q, B, Lq)
    check_rows_index(nend, kv_end, nq, q, B, Lq)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool or key_padding_mask.device != q.device:
            got = f"{key_padding_mask.dtype} on {key_padding_mask.device}" if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
            fail(f"{nmask} must be bool on {nq}'s device ({q.device}), got {got}")
        if tuple(key_padding_mask.shape) != (B, Lk):
            fail(f"{nmask} must have shape (B, Lk) = ({B}, {Lk}), got {tuple(key_padding_mask.shape)}")


def apply_scale(q, scale):
    """(q, float scale). A tensor scale is folded into q (q * scale, scale 1), so that autograd
    gives it its gradient; a number must be a finite real."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or not scale.is_floating_point() or scale.device != q.device:
            fail(f"scale must be a number or a one-element float tensor on q's device ({q.device}), got "
                 f"{scale.dtype} of shape {tuple(scale.shape)} on {scale.device}")
        return q * scale.reshape(()).to(q.dtype), 1.0
    if scale is None:
        if q.shape[-1] == 0:
            fail("q's head dim is 0, so the default scale D ** -0.5 is undefined; pass scale= explicitly")
        return q, q.shape[-1] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        fail(f"scale must be a finite real number or a tensor, got {scale!r} ({type(scale).__name__})")
    return q, float(scale)


def check_causal(causal) -> bool:
    if not isinstance(causal, bool):
        fail(f"causal must be True or False, got {causal!r}")
    return causal


def check_dropout(p) -> float:
    if type(p) is float and 0.0 <= p < 1.0:  # the common case, without numbers.Real's slow isinstance
        return p
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
        fail(f"dropout_p must be a number in [0, 1), got {p!r}")
    return float(p)


def dropout_seed(q):
    """A fresh 63-bit Philox key from torch's generator for q's device: torch.manual_seed
    reproduces it, and it stays on the device (no host sync, CUDA graphs replay a new draw)."""
    return torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=q.device)


def attention_dropout_mask(q: Tensor, k: Tensor, dropout_p: float) -> Tensor:
    """Debug entry: the (B, Hq, Lq, Lk) bool mask of the attention probabilities that
    cross_attention(q, k, v, dropout_p=dropout_p) keeps when torch's generator for q's device is
    in its current state (it draws the Philox key as cross_attention does; seed both the same way
    to compare). Kept probabilities are scaled by 1 / (1 - dropout_p)."""
    dropout_p = check_dropout(dropout_p)
    check_float("q", q)
    check_float("k", k)
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0]:
        fail(f"q and k must be (B, H, L, D) with the same B, got {tuple(q.shape)} and {tuple(k.shape)}")
    B, H, Lq, _ = q.shape
    return reference.dropout_keep(dropout_seed(q), B, H, Lq, k.shape[2], dropout_p)


def _problem(q, k, v, *rest):
    return Problem.of("cross_attention", q, k, v, head_dim=q.shape[-1])


def check_operator(q, k, v, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal, dropout_p, seed, scale):
    """The operator's arguments (a direct torch.ops call included)."""
    check_attention_inputs(q, k, v, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end)
    check_dropout(dropout_p)
    if dropout_p > 0 and not (isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.numel() >= 1
                              and seed.device == q.device):
        fail(f"seed must be an int64 tensor with one element on q's device ({q.device}) when dropout_p > 0, got "
             f"{seed.dtype if isinstance(seed, torch.Tensor) else type(seed).__name__}")
    check_index_values("kv_lengths", kv_lengths, k.shape[2])
    check_index_values("q_lengths", q_lengths, q.shape[2])


def check_backward_operator(grad_out, q, k, v, out, lse, *visibility):
    check_operator(q, k, v, *visibility)
    for name, t in (("grad_out", grad_out), ("out", out)):
        check_shape(name, t, tuple(q.shape), "q", q)
        check_last_dim_contiguous(name, t)
    shape, dtype = stats_shape(q.dtype, tuple(q.shape[:3]))
    check_shape("lse", lse, shape, "q", q, dtype=dtype)


def _fake_forward(q, k, v, *rest):
    shape, dtype = stats_shape(q.dtype, q.shape[:3])
    return torch.empty_like(q), q.new_empty(shape, dtype=dtype)


def _fake_backward(grad_out, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal, dropout_p, seed, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, seed)
    ctx.causal, ctx.dropout_p, ctx.scale = causal, dropout_p, scale


def _autograd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, seed = ctx.saved_tensors
    if grad_out.stride(-1) != 1:  # e.g. the expanded gradient of out.sum()
        grad_out = grad_out.contiguous()
    dq, dk, dv = ctx.backward_op(
        grad_out, q, k, v, out, lse, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, ctx.causal,
        ctx.dropout_p, seed, ctx.scale, ctx.backend
    )
    return dq, dk, dv, *(None,) * 10


# cross_attention and co_attention run on the same kernels, so they take the same inputs.
ATTENTION_BACKENDS = {
    "reference": Capability(),
    "cpu": Capability(),
    "cuda": Capability(dtypes=HALVES, head_dims=CUDA_ATTENTION_HEAD_DIMS, aligned_rows=True, auto=native.CUDA_ATTENTION_VERIFIED,
                       gpu_verified=native.CUDA_ATTENTION_VERIFIED, fits=native.attention_fits),
    "triton": Capability(dtypes=HALVES_AND_FLOAT32, head_dims=range(1, TRITON_MAX_HEAD_DIM + 1), fits=triton_backend.attention_fits),
}


def _example():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 8, generator=g).requires_grad_() for n in (5, 9, 9))
    return [q, k, v, torch.tensor([9, 4]), None, torch.tensor([5, 3]), None, None, False, 0.0, None, 0.25]


_op = register_op(OpSpec(
    name="cross_attention", function=cross_attention, layer="CrossModalAttention", problem=_problem, check=check_operator,
    check_backward=check_backward_operator, fake=_fake_forward, backward_fake=_fake_backward, setup_context=_setup_context,
    backward=_autograd_backward, example=_example, shared=("seed",), heads=("q", "k", "v", "out", "lse", "grad_out"),
    backends=ATTENTION_BACKENDS,
))
