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

from mmkernels.backends.base import co_attention_backward_by_two_calls, co_attention_by_two_calls
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
def _query_block(pid_m, pid_bh, KvLen, QLen, Hq, Lq, Lk, group,
                 HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """What a forward or dQ program owns: batch b, its query head and kv head as int64 offsets
    (b too), the keys to visit, the valid query count, its BLOCK_M rows and which are not padding."""
    b = pid_bh // Hq
    h = pid_bh % Hq
    n_keys, q_valid = _lengths(KvLen, QLen, b, Lq, Lk, HAS_KVLEN, HAS_QLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return b, b.to(tl.int64), h.to(tl.int64), (h // group).to(tl.int64), n_keys, q_valid, rows, rows < q_valid


@triton.jit
def _visible(Mask, smb, sml, b, cols, n_keys, HAS_MASK: tl.constexpr):
    """(BLOCK_N,) True for keys that take part: inside the length and not masked out."""
    visible = cols < n_keys
    if HAS_MASK:
        ignored = tl.load(Mask + b.to(tl.int64) * smb + cols.to(tl.int64) * sml, mask=visible, other=1)
        visible = visible & (ignored == 0)
    return visible


@triton.jit
def _fwd_program(
    pid_m, pid_bh,
    Q, K, V, Out, Lse, KvLen, Mask, QLen,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, smb, sml,
    Hq, Lq, Lk, group, scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_QLEN: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, b64, h64, hk64, n_keys, q_valid, rows, row_ok = _query_block(
        pid_m, pid_bh, KvLen, QLen, Hq, Lq, Lk, group, HAS_KVLEN, HAS_QLEN, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    cols0 = tl.arange(0, BLOCK_N)
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


@triton.jit
def _bwd_dkdv_program(
    pid_n, pid_bh,
    Q, K, V, DO, Lse, Delta, DK, DV, KvLen, Mask, QLen,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl,
    sdkb, sdkh, sdkl, sdvb, sdvh, sdvl, smb, sml,
    Hq, Hkv, Lq, Lk, group, scale, scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_QLEN: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
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


@triton.jit
def _bwd_dq_program(
    pid_m, pid_bh,
    Q, K, V, DO, Lse, Delta, DQ, KvLen, Mask, QLen,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sdqb, sdqh, sdql, smb, sml,
    Hq, Lq, Lk, group, scale, scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_QLEN: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, b64, h64, hk64, n_keys, q_valid, rows, row_ok = _query_block(
        pid_m, pid_bh, KvLen, QLen, Hq, Lq, Lk, group, HAS_KVLEN, HAS_QLEN, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    cols0 = tl.arange(0, BLOCK_N)
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


@triton.autotune(configs=attention_configs("fwd"), key=["BLOCK_D", "HAS_MASK"])
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, KvLen, Mask, QLen,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, smb, sml,
    Hq, Lq, Lk, group, scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_QLEN: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    _fwd_program(tl.program_id(0), tl.program_id(1), Q, K, V, Out, Lse, KvLen, Mask, QLen, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, smb, sml, Hq, Lq, Lk, group, scale_log2, D, BLOCK_D, HAS_KVLEN, HAS_MASK, HAS_QLEN, PRECISION, BLOCK_M, BLOCK_N)


@triton.autotune(configs=attention_configs("fwd"), key=["BLOCK_D"])
@triton.jit
def _fwd_co_kernel(
    Q_a, K_a, V_a, Out_a, Lse_a, KvLen_a, Mask_a, QLen_a, sqb_a, sqh_a, sql_a, skb_a, skh_a, skl_a,
    svb_a, svh_a, svl_a, sob_a, soh_a, sol_a, smb_a, sml_a, Hq_a, Lq_a, Lk_a, group_a,
    scale_log2_a, Q_b, K_b, V_b, Out_b, Lse_b, KvLen_b, Mask_b, QLen_b, sqb_b, sqh_b, sql_b, skb_b,
    skh_b, skl_b, svb_b, svh_b, svl_b, sob_b, soh_b, sol_b, smb_b, sml_b, Hq_b, Lq_b, Lk_b,
    group_b, scale_log2_b, BH_A,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN_A: tl.constexpr, HAS_QLEN_A: tl.constexpr, HAS_KVLEN_B: tl.constexpr, HAS_QLEN_B: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Both directions of co-attention in one launch: programs below BH_A run direction a."""
    pid_bh = tl.program_id(1)
    if pid_bh < BH_A:
        _fwd_program(tl.program_id(0), pid_bh, Q_a, K_a, V_a, Out_a, Lse_a, KvLen_a, Mask_a, QLen_a, sqb_a, sqh_a, sql_a, skb_a, skh_a, skl_a, svb_a, svh_a, svl_a, sob_a, soh_a, sol_a, smb_a, sml_a, Hq_a, Lq_a, Lk_a, group_a, scale_log2_a, D, BLOCK_D, HAS_KVLEN_A, False, HAS_QLEN_A, PRECISION, BLOCK_M, BLOCK_N)
    else:
        _fwd_program(tl.program_id(0), pid_bh - BH_A, Q_b, K_b, V_b, Out_b, Lse_b, KvLen_b, Mask_b, QLen_b, sqb_b, sqh_b, sql_b, skb_b, skh_b, skl_b, svb_b, svh_b, svl_b, sob_b, soh_b, sol_b, smb_b, sml_b, Hq_b, Lq_b, Lk_b, group_b, scale_log2_b, D, BLOCK_D, HAS_KVLEN_B, False, HAS_QLEN_B, PRECISION, BLOCK_M, BLOCK_N)


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
    _bwd_dkdv_program(tl.program_id(0), tl.program_id(1), Q, K, V, DO, Lse, Delta, DK, DV, KvLen, Mask, QLen, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sdkb, sdkh, sdkl, sdvb, sdvh, sdvl, smb, sml, Hq, Hkv, Lq, Lk, group, scale, scale_log2, D, BLOCK_D, HAS_KVLEN, HAS_MASK, HAS_QLEN, PRECISION, BLOCK_M, BLOCK_N)


@triton.autotune(configs=attention_configs("bwd"), key=["BLOCK_D"])
@triton.jit
def _bwd_dkdv_co_kernel(
    Q_a, K_a, V_a, DO_a, Lse_a, Delta_a, DK_a, DV_a, KvLen_a, Mask_a, QLen_a, sqb_a, sqh_a, sql_a,
    skb_a, skh_a, skl_a, svb_a, svh_a, svl_a, sdb_a, sdh_a, sdl_a, sdkb_a, sdkh_a, sdkl_a, sdvb_a,
    sdvh_a, sdvl_a, smb_a, sml_a, Hq_a, Hkv_a, Lq_a, Lk_a, group_a, scale_a, scale_log2_a, Q_b,
    K_b, V_b, DO_b, Lse_b, Delta_b, DK_b, DV_b, KvLen_b, Mask_b, QLen_b, sqb_b, sqh_b, sql_b,
    skb_b, skh_b, skl_b, svb_b, svh_b, svl_b, sdb_b, sdh_b, sdl_b, sdkb_b, sdkh_b, sdkl_b, sdvb_b,
    sdvh_b, sdvl_b, smb_b, sml_b, Hq_b, Hkv_b, Lq_b, Lk_b, group_b, scale_b, scale_log2_b, BH_A,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN_A: tl.constexpr, HAS_QLEN_A: tl.constexpr, HAS_KVLEN_B: tl.constexpr, HAS_QLEN_B: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Both directions of co-attention in one launch: programs below BH_A run direction a."""
    pid_bh = tl.program_id(1)
    if pid_bh < BH_A:
        _bwd_dkdv_program(tl.program_id(0), pid_bh, Q_a, K_a, V_a, DO_a, Lse_a, Delta_a, DK_a, DV_a, KvLen_a, Mask_a, QLen_a, sqb_a, sqh_a, sql_a, skb_a, skh_a, skl_a, svb_a, svh_a, svl_a, sdb_a, sdh_a, sdl_a, sdkb_a, sdkh_a, sdkl_a, sdvb_a, sdvh_a, sdvl_a, smb_a, sml_a, Hq_a, Hkv_a, Lq_a, Lk_a, group_a, scale_a, scale_log2_a, D, BLOCK_D, HAS_KVLEN_A, False, HAS_QLEN_A, PRECISION, BLOCK_M, BLOCK_N)
    else:
        _bwd_dkdv_program(tl.program_id(0), pid_bh - BH_A, Q_b, K_b, V_b, DO_b, Lse_b, Delta_b, DK_b, DV_b, KvLen_b, Mask_b, QLen_b, sqb_b, sqh_b, sql_b, skb_b, skh_b, skl_b, svb_b, svh_b, svl_b, sdb_b, sdh_b, sdl_b, sdkb_b, sdkh_b, sdkl_b, sdvb_b, sdvh_b, sdvl_b, smb_b, sml_b, Hq_b, Hkv_b, Lq_b, Lk_b, group_b, scale_b, scale_log2_b, D, BLOCK_D, HAS_KVLEN_B, False, HAS_QLEN_B, PRECISION, BLOCK_M, BLOCK_N)


@triton.autotune(configs=attention_configs("bwd"), key=["BLOCK_D", "HAS_MASK"])
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, KvLen, Mask, QLen,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sdqb, sdqh, sdql, smb, sml,
    Hq, Lq, Lk, group, scale, scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_QLEN: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    _bwd_dq_program(tl.program_id(0), tl.program_id(1), Q, K, V, DO, Lse, Delta, DQ, KvLen, Mask, QLen, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sdqb, sdqh, sdql, smb, sml, Hq, Lq, Lk, group, scale, scale_log2, D, BLOCK_D, HAS_KVLEN, HAS_MASK, HAS_QLEN, PRECISION, BLOCK_M, BLOCK_N)


@triton.autotune(configs=attention_configs("bwd"), key=["BLOCK_D"])
@triton.jit
def _bwd_dq_co_kernel(
    Q_a, K_a, V_a, DO_a, Lse_a, Delta_a, DQ_a, KvLen_a, Mask_a, QLen_a, sqb_a, sqh_a, sql_a, skb_a,
    skh_a, skl_a, svb_a, svh_a, svl_a, sdb_a, sdh_a, sdl_a, sdqb_a, sdqh_a, sdql_a, smb_a, sml_a,
    Hq_a, Lq_a, Lk_a, group_a, scale_a, scale_log2_a, Q_b, K_b, V_b, DO_b, Lse_b, Delta_b, DQ_b,
    KvLen_b, Mask_b, QLen_b, sqb_b, sqh_b, sql_b, skb_b, skh_b, skl_b, svb_b, svh_b, svl_b, sdb_b,
    sdh_b, sdl_b, sdqb_b, sdqh_b, sdql_b, smb_b, sml_b, Hq_b, Lq_b, Lk_b, group_b, scale_b,
    scale_log2_b, BH_A,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN_A: tl.constexpr, HAS_QLEN_A: tl.constexpr, HAS_KVLEN_B: tl.constexpr, HAS_QLEN_B: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Both directions of co-attention in one launch: programs below BH_A run direction a."""
    pid_bh = tl.program_id(1)
    if pid_bh < BH_A:
        _bwd_dq_program(tl.program_id(0), pid_bh, Q_a, K_a, V_a, DO_a, Lse_a, Delta_a, DQ_a, KvLen_a, Mask_a, QLen_a, sqb_a, sqh_a, sql_a, skb_a, skh_a, skl_a, svb_a, svh_a, svl_a, sdb_a, sdh_a, sdl_a, sdqb_a, sdqh_a, sdql_a, smb_a, sml_a, Hq_a, Lq_a, Lk_a, group_a, scale_a, scale_log2_a, D, BLOCK_D, HAS_KVLEN_A, False, HAS_QLEN_A, PRECISION, BLOCK_M, BLOCK_N)
    else:
        _bwd_dq_program(tl.program_id(0), pid_bh - BH_A, Q_b, K_b, V_b, DO_b, Lse_b, Delta_b, DQ_b, KvLen_b, Mask_b, QLen_b, sqb_b, sqh_b, sql_b, skb_b, skh_b, skl_b, svb_b, svh_b, svl_b, sdb_b, sdh_b, sdl_b, sdqb_b, sdqh_b, sdql_b, smb_b, sml_b, Hq_b, Lq_b, Lk_b, group_b, scale_b, scale_log2_b, D, BLOCK_D, HAS_KVLEN_B, False, HAS_QLEN_B, PRECISION, BLOCK_M, BLOCK_N)


def _flags(q, kv_lengths, key_padding_mask, q_lengths):
    return dict(
        D=q.shape[-1],
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
        HAS_KVLEN=kv_lengths is not None,
        HAS_MASK=key_padding_mask is not None,
        HAS_QLEN=q_lengths is not None,
        # fp32 inputs get fp32 products, not TF32: the same numbers as every other backend.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _side(q, k, kv_lengths, key_padding_mask, q_lengths):
    """The pointers and sizes one direction's kernels share: (lengths and mask pointers, mask
    strides, Hq, Hkv, Lq, Lk, group)."""
    dummy = q.new_empty(1, dtype=torch.int32)
    mask = key_padding_mask if key_padding_mask is not None else dummy
    ptrs = (kv_lengths if kv_lengths is not None else dummy, mask, q_lengths if q_lengths is not None else dummy)
    mask_strides = (mask.stride(0), mask.stride(1)) if key_padding_mask is not None else (0, 0)
    Hq, Hkv = q.shape[1], k.shape[1]
    return ptrs, mask_strides, Hq, Hkv, q.shape[2], k.shape[2], max(Hq // max(Hkv, 1), 1)


def _fwd_args(q, k, v, out, lse, kv_lengths, key_padding_mask, q_lengths, scale):
    (kvl, mask, ql), mask_strides, Hq, _, Lq, Lk, group = _side(q, k, kv_lengths, key_padding_mask, q_lengths)
    return (q, k, v, out, lse, kvl, mask, ql, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            *mask_strides, Hq, Lq, Lk, group, scale * LOG2E)


def _dkdv_args(q, k, v, grad_out, lse, delta, dk, dv, kv_lengths, key_padding_mask, q_lengths, scale):
    (kvl, mask, ql), mask_strides, Hq, Hkv, Lq, Lk, group = _side(q, k, kv_lengths, key_padding_mask, q_lengths)
    return (q, k, v, grad_out, lse, delta, dk, dv, kvl, mask, ql, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *grad_out.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], *mask_strides, Hq, Hkv, Lq, Lk, group, scale, scale * LOG2E)


def _dq_args(q, k, v, grad_out, lse, delta, dq, kv_lengths, key_padding_mask, q_lengths, scale):
    (kvl, mask, ql), mask_strides, Hq, _, Lq, Lk, group = _side(q, k, kv_lengths, key_padding_mask, q_lengths)
    return (q, k, v, grad_out, lse, delta, dq, kvl, mask, ql, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *grad_out.stride()[:3], *dq.stride()[:3], *mask_strides, Hq, Lq, Lk, group, scale, scale * LOG2E)


def _delta(out, grad_out, block_d):
    B, Hq, Lq, D = out.shape
    delta = torch.empty(B, Hq, Lq, dtype=torch.float32, device=out.device)
    block = 64 if not INTERPRET else 16
    _delta_kernel[(triton.cdiv(Lq, block), B * Hq)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], Hq, Lq, D=D, BLOCK_D=block_d, BLOCK_M=block,
    )
    return delta


def cross_attention(q, k, v, kv_lengths, key_padding_mask, q_lengths, scale):
    B, Hq, Lq, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(math.inf)
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)
    _fwd_kernel[grid](*_fwd_args(q, k, v, out, lse, kv_lengths, key_padding_mask, q_lengths, scale),
                      **_flags(q, kv_lengths, key_padding_mask, q_lengths))
    return out, lse


def cross_attention_backward(grad_out, q, k, v, out, lse, kv_lengths, key_padding_mask, q_lengths, scale):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    flags = _flags(q, kv_lengths, key_padding_mask, q_lengths)
    lse = lse.float().contiguous()
    delta = _delta(out, grad_out, flags["BLOCK_D"])
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * Hkv)](
        *_dkdv_args(q, k, v, grad_out, lse, delta, dk, dv, kv_lengths, key_padding_mask, q_lengths, scale), **flags)
    _bwd_dq_kernel[lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)](
        *_dq_args(q, k, v, grad_out, lse, delta, dq, kv_lengths, key_padding_mask, q_lengths, scale), **flags)
    return dq, dk, dv


def _co_flags(q_a, lengths_a, lengths_b):
    """Direction a: q_a over modality b's keys (kv_lengths = lengths_b, q_lengths = lengths_a); b mirrors it."""
    flags = _flags(q_a, None, None, None)
    del flags["HAS_KVLEN"], flags["HAS_MASK"], flags["HAS_QLEN"]
    return dict(flags, HAS_KVLEN_A=lengths_b is not None, HAS_QLEN_A=lengths_a is not None,
                HAS_KVLEN_B=lengths_a is not None, HAS_QLEN_B=lengths_b is not None)


def co_attention(q_a, k_a, v_a, q_b, k_b, v_b, lengths_a, lengths_b, scale):
    """Both directions in one launch per stage (forward: one; backward: dK/dV and dQ, one each,
    after two small delta launches)."""
    if min(t.numel() for t in (q_a, k_a, q_b, k_b)) == 0:  # nothing to launch for
        return co_attention_by_two_calls(cross_attention, q_a, k_a, v_a, q_b, k_b, v_b, lengths_a, lengths_b, scale)
    B = q_a.shape[0]
    out_a, out_b = torch.empty_like(q_a), torch.empty_like(q_b)
    lse_a = torch.empty(q_a.shape[:3], dtype=torch.float32, device=q_a.device)
    lse_b = torch.empty(q_b.shape[:3], dtype=torch.float32, device=q_b.device)
    grid = lambda meta: (max(triton.cdiv(q_a.shape[2], meta["BLOCK_M"]), triton.cdiv(q_b.shape[2], meta["BLOCK_M"])),
                         B * (q_a.shape[1] + q_b.shape[1]))
    _fwd_co_kernel[grid](*_fwd_args(q_a, k_b, v_b, out_a, lse_a, lengths_b, None, lengths_a, scale),
                         *_fwd_args(q_b, k_a, v_a, out_b, lse_b, lengths_a, None, lengths_b, scale),
                         B * q_a.shape[1], **_co_flags(q_a, lengths_a, lengths_b))
    return out_a, lse_a, out_b, lse_b


def co_attention_backward(grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b, out_a, lse_a, out_b, lse_b, lengths_a, lengths_b, scale):
    if min(t.numel() for t in (q_a, k_a, q_b, k_b)) == 0:
        return co_attention_backward_by_two_calls(cross_attention_backward, grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b,
                                                  out_a, lse_a, out_b, lse_b, lengths_a, lengths_b, scale)
    B = q_a.shape[0]
    flags = _co_flags(q_a, lengths_a, lengths_b)
    lse_a, lse_b = lse_a.float().contiguous(), lse_b.float().contiguous()
    delta_a, delta_b = _delta(out_a, grad_a, flags["BLOCK_D"]), _delta(out_b, grad_b, flags["BLOCK_D"])
    dq_a, dk_a, dv_a = torch.empty_like(q_a), torch.empty_like(k_a), torch.empty_like(v_a)
    dq_b, dk_b, dv_b = torch.empty_like(q_b), torch.empty_like(k_b), torch.empty_like(v_b)
    # direction a writes dK/dV of modality b's keys, direction b those of modality a
    _bwd_dkdv_co_kernel[lambda meta: (max(triton.cdiv(k_b.shape[2], meta["BLOCK_N"]), triton.cdiv(k_a.shape[2], meta["BLOCK_N"])),
                                      B * (k_b.shape[1] + k_a.shape[1]))](
        *_dkdv_args(q_a, k_b, v_b, grad_a, lse_a, delta_a, dk_b, dv_b, lengths_b, None, lengths_a, scale),
        *_dkdv_args(q_b, k_a, v_a, grad_b, lse_b, delta_b, dk_a, dv_a, lengths_a, None, lengths_b, scale),
        B * k_b.shape[1], **flags)
    _bwd_dq_co_kernel[lambda meta: (max(triton.cdiv(q_a.shape[2], meta["BLOCK_M"]), triton.cdiv(q_b.shape[2], meta["BLOCK_M"])),
                                    B * (q_a.shape[1] + q_b.shape[1]))](
        *_dq_args(q_a, k_b, v_b, grad_a, lse_a, delta_a, dq_a, lengths_b, None, lengths_a, scale),
        *_dq_args(q_b, k_a, v_a, grad_b, lse_b, delta_b, dq_b, lengths_a, None, lengths_b, scale),
        B * q_a.shape[1], **flags)
    return dq_a, dk_a, dv_a, dq_b, dk_b, dv_b
