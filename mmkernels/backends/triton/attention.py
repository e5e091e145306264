"""Triton cross-attention, FlashAttention-2 style.

Forward: a program per (block of BLOCK_M queries, batch x query head) streams K/V tiles with an
online softmax in base 2 (exp2) and fp32; the loop stops at the row's kv_length, so padded key
tiles are never loaded. It saves the natural-log log-sum-exp (+inf for rows that see no key).
Backward: a preprocess computes delta = rowsum(dO * O); a dK/dV kernel runs per (key block,
batch x kv head) and loops over the query heads of its group (GQA without copies) and their real
query rows; a dQ kernel runs per (query block, batch x query head). No atomics: deterministic.
Head dims are padded to the next power of two inside the kernel (masked loads), not in memory.
"""
import math

import torch
import triton
import triton.language as tl

from mmkernels.backends.triton.config import INTERPRET, attention_configs

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _lengths(KvLen, QLen, b, Lq, Lk, HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr):
    n_keys = Lk
    if HAS_KVLEN:
        n_keys = tl.minimum(tl.maximum(tl.load(KvLen + b).to(tl.int32), 0), Lk)
    q_valid = Lq
    if HAS_QLEN:
        q_valid = tl.minimum(tl.maximum(tl.load(QLen + b).to(tl.int32), 0), Lq)
    return n_keys, q_valid


@triton.jit
def _visible(Mask, smb, sml, b, cols, n_keys, HAS_MASK: tl.constexpr):
    """(BLOCK_N,) True for keys that take part: inside the length and not masked out."""
    visible = cols < n_keys
    if HAS_MASK:
        ignored = tl.load(Mask + b.to(tl.int64) * smb + cols.to(tl.int64) * sml, mask=visible, other=1)
        visible = visible & (ignored == 0)
    return visible


@triton.autotune(configs=attention_configs("fwd"), key=["BLOCK_D", "HAS_MASK"])
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, KvLen, Mask, QLen,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, smb, sml,
    Hq, Lq, Lk, group, scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_QLEN: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // group
    n_keys, q_valid = _lengths(KvLen, QLen, b, Lq, Lk, HAS_KVLEN, HAS_QLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    cols0 = tl.arange(0, BLOCK_N)
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)

    row_ok = rows < q_valid
    q = tl.load(Q + b64 * sqb + h64 * sqh + rows[:, None].to(tl.int64) * sql + dims[None, :],
                mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b64 * skb + hk64 * skh
    v_base = V + b64 * svb + hk64 * svh
    n_end = tl.where(pid_m * BLOCK_M < q_valid, n_keys, 0)  # padded query blocks load nothing
    for start in range(0, n_end, BLOCK_N):
        cols = start + cols0
        visible = _visible(Mask, smb, sml, b, cols, n_keys, HAS_MASK)
        kt = tl.load(k_base + cols[None, :].to(tl.int64) * skl + dims[:, None],
                     mask=(cols[None, :] < n_keys) & (dims[:, None] < D), other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * svl + dims[None, :],
                    mask=(cols[:, None] < n_keys) & (dims[None, :] < D), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    out = tl.where(empty[:, None] | ~row_ok[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse = tl.where(empty | ~row_ok, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    in_range = rows < Lq
    tl.store(Out + b64 * sob + h64 * soh + rows[:, None].to(tl.int64) * sol + dims[None, :],
             out.to(Out.dtype.element_ty), mask=in_range[:, None] & (dims[None, :] < D))
    tl.store(Lse + pid_bh.to(tl.int64) * Lq + rows, lse, mask=in_range)


@triton.jit
def _delta_kernel(O, DO, Delta, sob, soh, sol, sdb, sdh, sdl, Hq, Lq,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < Lq) & (dims[None, :] < D)
    o = tl.load(O + b * sob + h * soh + rows[:, None].to(tl.int64) * sol + dims[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None].to(tl.int64) * sdl + dims[None, :], mask=mask, other=0.0)
    tl.store(Delta + pid_bh.to(tl.int64) * Lq + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < Lq)


@triton.jit
def _probabilities(q, kt, lse_row, visible, scale_log2, PRECISION: tl.constexpr):
    """P = exp(scale q k^T - lse) for a (BLOCK_M, BLOCK_N) tile; 0 for hidden keys and empty rows."""
    s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
    p = tl.math.exp2(s - lse_row[:, None] * LOG2E)
    return tl.where(visible[None, :], p, 0.0)


@triton.autotune(configs=attention_configs("bwd"), key=["BLOCK_D", "HAS_MASK"])
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, KvLen, Mask, QLen,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl,
    sdkb, sdkh, sdkl, sdvb, sdvh, sdvl, smb, sml,
    Hq, Hkv, Lq, Lk, group, scale, scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_QLEN: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    n_keys, q_valid = _lengths(KvLen, QLen, b, Lq, Lk, HAS_KVLEN, HAS_QLEN)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    rows0 = tl.arange(0, BLOCK_M)
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)
    col_ok = cols < n_keys
    visible = _visible(Mask, smb, sml, b, cols, n_keys, HAS_MASK)
    kv_mask = col_ok[:, None] & (dims[None, :] < D)
    k = tl.load(K + b64 * skb + hk64 * skh + cols[:, None].to(tl.int64) * skl + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * svb + hk64 * svh + cols[:, None].to(tl.int64) * svl + dims[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    m_end = tl.where(pid_n * BLOCK_N < n_keys, q_valid, 0)  # padded key blocks only write zeros
    for g in range(0, group):
        h64 = (hk * group + g).to(tl.int64)
        stat = (b64 * Hq + h64) * Lq
        for start in range(0, m_end, BLOCK_M):
            rows = start + rows0
            row_ok = rows < q_valid
            q_mask = row_ok[:, None] & (dims[None, :] < D)
            q = tl.load(Q + b64 * sqb + h64 * sqh + rows[:, None].to(tl.int64) * sql + dims[None, :], mask=q_mask, other=0.0)
            do = tl.load(DO + b64 * sdb + h64 * sdh + rows[:, None].to(tl.int64) * sdl + dims[None, :], mask=q_mask, other=0.0)
            lse = tl.load(Lse + stat + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(Delta + stat + rows, mask=row_ok, other=0.0)
            p = _probabilities(q, tl.trans(k), lse, visible, scale_log2, PRECISION)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    in_range = (cols[:, None] < Lk) & (dims[None, :] < D)
    tl.store(DK + b64 * sdkb + hk64 * sdkh + cols[:, None].to(tl.int64) * sdkl + dims[None, :], (dk * scale).to(DK.dtype.element_ty), mask=in_range)
    tl.store(DV + b64 * sdvb + hk64 * sdvh + cols[:, None].to(tl.int64) * sdvl + dims[None, :], dv.to(DV.dtype.element_ty), mask=in_range)


@triton.autotune(configs=attention_configs("bwd"), key=["BLOCK_D", "HAS_MASK"])
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, KvLen, Mask, QLen,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sdqb, sdqh, sdql, smb, sml,
    Hq, Lq, Lk, group, scale, scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_QLEN: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // group
    n_keys, q_valid = _lengths(KvLen, QLen, b, Lq, Lk, HAS_KVLEN, HAS_QLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    cols0 = tl.arange(0, BLOCK_N)
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    row_ok = rows < q_valid
    q_mask = row_ok[:, None] & (dims[None, :] < D)
    q = tl.load(Q + b64 * sqb + h64 * sqh + rows[:, None].to(tl.int64) * sql + dims[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b64 * sdb + h64 * sdh + rows[:, None].to(tl.int64) * sdl + dims[None, :], mask=q_mask, other=0.0)
    stat = pid_bh.to(tl.int64) * Lq
    lse = tl.load(Lse + stat + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + stat + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_end = tl.where(pid_m * BLOCK_M < q_valid, n_keys, 0)
    for start in range(0, n_end, BLOCK_N):
        cols = start + cols0
        visible = _visible(Mask, smb, sml, b, cols, n_keys, HAS_MASK)
        kv_mask = (cols[None, :] < n_keys) & (dims[:, None] < D)
        kt = tl.load(K + b64 * skb + hk64 * skh + cols[None, :].to(tl.int64) * skl + dims[:, None], mask=kv_mask, other=0.0)
        vt = tl.load(V + b64 * svb + hk64 * svh + cols[None, :].to(tl.int64) * svl + dims[:, None], mask=kv_mask, other=0.0)
        p = _probabilities(q, kt, lse, visible, scale_log2, PRECISION)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    tl.store(DQ + b64 * sdqb + h64 * sdqh + rows[:, None].to(tl.int64) * sdql + dims[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=(rows[:, None] < Lq) & (dims[None, :] < D))


def _common(q, kv_lengths, key_padding_mask, q_lengths):
    dummy = q.new_empty(1, dtype=torch.int32)
    mask = key_padding_mask if key_padding_mask is not None else dummy
    flags = dict(
        D=q.shape[-1],
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
        HAS_KVLEN=kv_lengths is not None,
        HAS_MASK=key_padding_mask is not None,
        HAS_QLEN=q_lengths is not None,
        # fp32 inputs get fp32 products, not TF32: the same numbers as every other backend.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    args = (kv_lengths if kv_lengths is not None else dummy, mask, q_lengths if q_lengths is not None else dummy)
    mask_strides = (mask.stride(0), mask.stride(1)) if key_padding_mask is not None else (0, 0)
    return args, mask_strides, flags


def cross_attention(q, k, v, kv_lengths, key_padding_mask, q_lengths, scale):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(math.inf)
    (kvl, mask, ql), mask_strides, flags = _common(q, kv_lengths, key_padding_mask, q_lengths)
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)
    _fwd_kernel[grid](
        q, k, v, out, lse, kvl, mask, ql,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *mask_strides,
        Hq, Lq, Lk, max(Hq // max(Hkv, 1), 1), scale * LOG2E, **flags,
    )
    return out, lse


def cross_attention_backward(grad_out, q, k, v, out, lse, kv_lengths, key_padding_mask, q_lengths, scale):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    (kvl, mask, ql), mask_strides, flags = _common(q, kv_lengths, key_padding_mask, q_lengths)
    lse = lse.float().contiguous()
    delta = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    block = 64 if not INTERPRET else 16
    _delta_kernel[(triton.cdiv(Lq, block), B * Hq)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], Hq, Lq,
        D=D, BLOCK_D=flags["BLOCK_D"], BLOCK_M=block,
    )
    group = max(Hq // max(Hkv, 1), 1)
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * Hkv)](
        q, k, v, grad_out, lse, delta, dk, dv, kvl, mask, ql,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3],
        *dk.stride()[:3], *dv.stride()[:3], *mask_strides,
        Hq, Hkv, Lq, Lk, group, scale, scale * LOG2E, **flags,
    )
    _bwd_dq_kernel[lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)](
        q, k, v, grad_out, lse, delta, dq, kvl, mask, ql,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dq.stride()[:3], *mask_strides,
        Hq, Lq, Lk, group, scale, scale * LOG2E, **flags,
    )
    return dq, dk, dv
