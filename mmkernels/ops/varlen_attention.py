"""varlen_attention: flash-attn's packed variable-length attention, on every backend.

Several sequences packed into one (total, H, D) tensor, cut by cumulative lengths, is how
flash-attn users (and vision encoders that pack images, Qwen2-VL's cu_seqlens) write ragged
batches. It is cross_attention with one batch of `total` rows whose key ranges stop at their
sequence's edges: each row sees one span of keys, which the kernels walk tile by tile, so a
query block never loads another sequence's keys. The packed tensors are taken as they are
((total, H, D) viewed as (1, H, total, D), no copy), and the ranges are computed on the device
(no host sync)."""
import numbers

import torch
from torch import Tensor

from mmkernels.ops.checks import INDEX_DTYPES, check_float, fail, values_free
from mmkernels.ops.cross_attention import cross_attention


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, *, dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
                     window_size: tuple[int, int] = (-1, -1), backend: str | None = None) -> Tensor:
    """flash_attn_varlen_func's semantics: q (total_q, Hq, D), k and v (total_k, Hkv, D), Hq a
    multiple of Hkv (grouped-query attention); sequence s is q[cu_seqlens_q[s]:cu_seqlens_q[s+1]]
    over k[cu_seqlens_k[s]:cu_seqlens_k[s+1]] (cu_seqlens int32 or int64, (num_seqs + 1,),
    non-decreasing, on q's device).

    causal: row i of a sequence of lengths (Lq, Lk) sees keys j <= i + Lk - Lq (aligned
    bottom-right); window_size (left, right): keys i + Lk - Lq - left <= j <= i + Lk - Lq + right,
    a negative side unbounded; causal sets right to 0. A row that sees no key, and every row past
    cu_seqlens_q[-1], outputs 0 and passes no gradient. dropout_p and softmax_scale (D ** -0.5 by
    default) as in cross_attention. max_seqlen_q/_k are accepted for flash-attn's signature (ints,
    or one-element tensors as transformers passes them); the kernels size their work from the
    ranges instead.
    Returns (total_q, Hq, D), contiguous, in q's dtype."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != 3:
            fail(f"{name} must be 3-D (total, H, D) (flash-attn's packed layout), got shape {tuple(t.shape)}")
    kv_start, kv_end = packed_ranges(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, k.shape[0], causal, window_size)
    out = cross_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                          kv_start=kv_start, kv_end=kv_end, dropout_p=dropout_p, scale=softmax_scale, backend=backend)
    return out.squeeze(0).transpose(0, 1)  # out keeps q's layout: this is (total_q, Hq, D), contiguous


def packed_ranges(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_k, causal, window_size):
    """(kv_start, kv_end), each (1, total_q): the span of packed keys each packed query row sees."""
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, torch.Tensor) or t.dtype not in INDEX_DTYPES or t.device != q.device or t.dim() != 1 or not t.numel():
            got = (f"{t.dtype} of shape {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__)
            fail(f"{name} must be a 1-D int32 or int64 tensor (num_seqs + 1,) on q's device ({q.device}), got {got}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        fail(f"cu_seqlens_q and cu_seqlens_k must hold the same number of sequences, got {cu_seqlens_q.numel() - 1} "
             f"and {cu_seqlens_k.numel() - 1}")
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        check_max_seqlen(name, n)
    if not (isinstance(causal, bool) and isinstance(window_size, (tuple, list)) and len(window_size) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        fail(f"causal must be a bool and window_size a pair of ints (left, right), got {causal!r} and {window_size!r}")
    total_q = q.shape[0]
    check_offsets("cu_seqlens_q", cu_seqlens_q, total_q)
    check_offsets("cu_seqlens_k", cu_seqlens_k, total_k)
    # A window wider than every sequence is unbounded; clamped here, it cannot overflow the index math.
    widest = max(total_q, total_k) + 1
    left, right = (min(w, widest) for w in window_size)
    if causal:
        right = 0

    dtype = torch.int64 if max(total_q, total_k) >= 2**31 else torch.int32
    cu_q, cu_k = cu_seqlens_q.to(dtype), cu_seqlens_k.to(dtype)
    rows = torch.arange(total_q, dtype=dtype, device=q.device)
    if cu_q.numel() == 1:  # no sequence: no row sees anything
        return (torch.zeros(1, total_q, dtype=dtype, device=q.device),) * 2
    seq = (torch.searchsorted(cu_q, rows, right=True) - 1).clamp_(0, cu_q.numel() - 2)
    q_start, k_start = cu_q[seq], cu_k[seq]
    q_len, k_len = cu_q[seq + 1] - q_start, cu_k[seq + 1] - k_start
    diagonal = rows - q_start + k_len - q_len  # the key on row i's bottom-right diagonal, in its sequence
    lo = (diagonal - left).clamp_(min=0) if left >= 0 else torch.zeros_like(diagonal)
    hi = torch.minimum(diagonal + (right + 1), k_len) if right >= 0 else k_len
    inside = (rows >= q_start) & (rows < q_start + q_len)  # rows before cu_q[0] or past cu_q[-1] see nothing
    empty = torch.zeros_like(lo)
    kv_start = torch.where(inside, k_start + lo, empty)
    kv_end = torch.where(inside & (hi > lo), k_start + hi, empty)
    return kv_start.unsqueeze(0), kv_end.unsqueeze(0)


def check_max_seqlen(name, n):
    """An int-like (a Python or NumPy int, a SymInt under torch.compile, a one-element integer
    tensor as transformers passes it); only checked, since the ranges size the kernels' work."""
    if isinstance(n, torch.Tensor):
        if n.numel() != 1 or n.is_floating_point() or n.is_complex():
            fail(f"{name} must be an int or a one-element integer tensor, got {n.dtype} of shape {tuple(n.shape)}")
        return
    if isinstance(n, torch.SymInt):
        return
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        fail(f"{name} must be a non-negative int, got {n!r}")


def check_offsets(name, cu, total):
    """cu must be non-decreasing within [0, total]: checked on the host where that is free, else
    by a device-side assert (no sync); the kernels clamp every range to the keys either way."""
    if torch.compiler.is_compiling():
        return
    ok = (cu[1:] >= cu[:-1]).all() & (cu[0] >= 0) & (cu[-1] <= total)
    if values_free(cu):
        if not bool(ok):
            fail(f"{name} must be non-decreasing offsets in [0, {total}] (the packed length), got {cu.tolist()}")
    else:
        torch._assert_async(ok, f"{name} must be non-decreasing offsets in [0, {total}] (the packed length)")
