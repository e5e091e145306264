"""Triton cross-attention, FlashAttention-2 style.

Forward: a program per (block of BLOCK_M queries, batch x query head). It computes each row's
key range (kv_start/kv_end, kv_lengths, causal, and the first/last key the key_padding_mask
leaves) and streams only the K/V tiles that meet their union, with an online softmax in base 2
(exp2) and fp32; a tile that no row sees, or that the mask hides whole, is skipped before it is
loaded. It saves the softmax statistics (mmkernels.backends.base.stats_shape): for float32 inputs the
row max and log2 of the row sum apart in float64, so that the backward recomputes the forward's
probabilities exactly; for half inputs the natural log-sum-exp (+inf for rows with no key).
Backward: a preprocess computes delta = rowsum(dO * O); a dK/dV kernel runs per (key block,
batch x kv head) and loops over the query heads of its group (GQA without copies) and the query
blocks whose rows see its keys; a dQ kernel runs per (query block, batch x query head) over the
key tiles its rows see. No atomics: deterministic.

Hidden keys never influence anything: scores are selected (not multiplied) away, and the
products with V, K, Q and dO use copies whose non-finite entries are zeroed; a visible
non-finite entry makes the output it reaches NaN. Dropout draws Philox numbers exactly as the
other backends do (csrc/philox.h). Head dims are padded to the next power of two inside the
kernel (masked loads), not in memory, so any head dim up to 256 runs.
"""
import math

import torch
import triton
import triton.language as tl

from mmkernels.backends.base import stats_shape
from mmkernels.backends.reference import dropout_threshold
from mmkernels.backends.triton.config import INTERPRET, attention_autotune

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # a constexpr: kernels may read only those globals


@triton.jit
def _row_ranges(b, rows, Lq, Lk, KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, MaskLo, MaskHi,
                HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_START: tl.constexpr, HAS_END: tl.constexpr,
                HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """lo, hi, active for the rows: row i sees keys lo <= j < hi (less any the mask hides);
    rows that see nothing (padding, empty ranges) are inactive, with lo = hi = 0."""
    in_q = rows < Lq
    active = in_q
    if HAS_QLEN:
        active = active & (rows < tl.minimum(tl.maximum(tl.load(QLen + b * s_ql), 0), Lq))
    lo = tl.zeros(rows.shape, tl.int32)
    hi = tl.zeros(rows.shape, tl.int32) + Lk
    if HAS_START:
        lo = tl.minimum(tl.maximum(tl.load(Start + b * s_stb + rows.to(tl.int64) * s_stl, mask=in_q, other=0), 0), Lk).to(tl.int32)
    if HAS_END:
        hi = tl.minimum(tl.maximum(tl.load(End + b * s_enb + rows.to(tl.int64) * s_enl, mask=in_q, other=0), 0), Lk).to(tl.int32)
    if HAS_KVLEN:
        hi = tl.minimum(hi, tl.minimum(tl.maximum(tl.load(KvLen + b * s_kvl), 0), Lk).to(tl.int32))
    if CAUSAL:
        hi = tl.minimum(hi, rows + 1 + Lk - Lq)
    if HAS_MASK:
        lo = tl.maximum(lo, tl.load(MaskLo + b))
        hi = tl.minimum(hi, tl.load(MaskHi + b))
    active = active & (hi > lo)
    return tl.where(active, lo, 0), tl.where(active, hi, 0), active


@triton.jit
def _visible(lo, hi, cols, Mask, smb, sml, b, Lk, HAS_MASK: tl.constexpr):
    """(BLOCK_M, BLOCK_N): row i sees key j. Keys past Lk are never visible (lo/hi are clamped)."""
    vis = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
    if HAS_MASK:
        hidden = tl.load(Mask + b.to(tl.int64) * smb + cols.to(tl.int64) * sml, mask=cols < Lk, other=1)
        vis = vis & (hidden == 0)[None, :]
    return vis


@triton.jit
def _keep(Seed, row0, rows, col0, threshold, BLOCK_N: tl.constexpr):
    """Dropout's keep mask for query rows (their (b * Hq + h) * Lq + i index starts at row0) and
    keys col0 + arange(BLOCK_N), col0 a multiple of 4: Philox4x32-10 with counter
    (row, row >> 32, j >> 2, 0), output j & 3. One Philox call serves four keys, so it runs on a
    (rows, BLOCK_N / 4) tile and its four outputs are interleaved back into key order."""
    seed = tl.load(Seed)
    row = row0 + rows.to(tl.int64)
    zero = tl.zeros([rows.shape[0], BLOCK_N // 4], tl.uint32)
    c0 = (row & 0xFFFFFFFF).to(tl.uint32)[:, None] + zero
    c1 = (row >> 32).to(tl.uint32)[:, None] + zero
    c2 = ((col0 >> 2) + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)[None, :] + zero
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, zero)
    draw = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # r0 r1 r2 r3 of group 0, then group 1, ...
    return draw.to(tl.int64) >= threshold


@triton.jit
def _hits(vis, bad):
    """(rows, D): how many visible keys with a non-finite value each output meets. 0/1 operands
    in float16 are exact (and sums stay far below 2048), and take the tensor cores: no fp32
    operand tiles in shared memory for this rare path. NaN added to an accumulator stays NaN."""
    return tl.dot(vis.to(tl.float16), bad.to(tl.float16))


@triton.jit
def _finite(x):
    return (x == x) & (tl.abs(x) != float("inf"))


@triton.jit
def _stats_base2(Lse, rows, mask, PAIR: tl.constexpr):
    """(max, log2 sum) of the given query rows in base-2 score units, so that exp2((s - max) - log2 sum)
    is the forward's probability. PAIR (float32 inputs): the forward saved both apart, in float64;
    else the natural log-sum-exp. Rows not in `mask` (and rows with no key: max +inf) get P = 0."""
    if PAIR:
        m = tl.load(Lse + 2 * rows, mask=mask, other=float("inf")).to(tl.float32)
        log_sum = tl.load(Lse + 2 * rows + 1, mask=mask, other=0.0).to(tl.float32)
    else:
        m = tl.load(Lse + rows, mask=mask, other=float("inf")) * 1.4426950408889634
        log_sum = tl.zeros(m.shape, tl.float32)
    return m, log_sum


@triton.jit
def fwd_program(
    pid_m, pid_bh,
    Q, K, V, Out, Lse, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
    KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed,
    Hq, Lq, Lk, group, scale_log2, threshold, keep_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_START: tl.constexpr,
    HAS_END: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PAIR: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = pid_bh // Hq
    h = pid_bh % Hq
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), (h // group).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    lo, hi, active = _row_ranges(b, rows, Lq, Lk, KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl,
                                 MaskLo, MaskHi, HAS_KVLEN, HAS_QLEN, HAS_START, HAS_END, HAS_MASK, CAUSAL)
    first = tl.min(tl.where(active, lo, Lk)) // BLOCK_N * BLOCK_N  # aligned tiles: dropout draws four keys at a time
    last = tl.max(hi)
    dims = tl.arange(0, BLOCK_D)
    in_q = rows < Lq
    q = tl.load(Q + b64 * sqb + h64 * sqh + rows[:, None].to(tl.int64) * sql + dims[None, :],
                mask=in_q[:, None] & (dims[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    seen = tl.zeros([BLOCK_M], tl.int32)
    k_base = K + b64 * skb + hk64 * skh
    v_base = V + b64 * svb + hk64 * svh
    row0 = (b64 * Hq + h64) * Lq
    for start in range(first, last, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        vis = _visible(lo, hi, cols, Mask, smb, sml, b, Lk, HAS_MASK)
        if tl.max(vis.to(tl.int32)) > 0:  # a tile no row sees is never loaded
            kv_ok = (cols < Lk)
            kt = tl.load(k_base + cols[None, :].to(tl.int64) * skl + dims[:, None],
                         mask=kv_ok[None, :] & (dims[:, None] < D), other=0.0)
            s = tl.where(vis, tl.dot(q, kt, input_precision=PRECISION) * scale_log2, float("-inf"))
            seen = tl.maximum(seen, tl.max(vis.to(tl.int32), 1))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:
                p = tl.where(_keep(Seed, row0, rows, start, threshold, BLOCK_N), p * keep_scale, 0.0)
            v = tl.load(v_base + cols[:, None].to(tl.int64) * svl + dims[None, :],
                        mask=kv_ok[:, None] & (dims[None, :] < D), other=0.0)
            v_ok = _finite(v)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), tl.where(v_ok, v, 0.0), input_precision=PRECISION)
            if tl.min(v_ok.to(tl.int32)) == 0:  # rare: an output a visible non-finite value reaches is NaN
                acc += tl.where(_hits(vis, v_ok == 0) > 0, float("nan"), 0.0)
            m_i = m_new
    empty = seen == 0
    overflow = (l_i == 0.0) & ~empty  # visible keys whose scores all overflowed: NaN, not a silent 0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None])
    out = tl.where(overflow[:, None], float("nan"), out)
    log2_sum = tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i))
    m_i = tl.where(empty, float("inf"), tl.where(overflow, float("-inf"), m_i))  # no key: P = 0 in the backward
    tl.store(Out + b64 * sob + h64 * soh + rows[:, None].to(tl.int64) * sol + dims[None, :],
             out.to(Out.dtype.element_ty), mask=in_q[:, None] & (dims[None, :] < D))
    if PAIR:  # the max and the log of the sum apart (mmkernels.backends.base.stats_shape), base 2
        tl.store(Lse + 2 * (row0 + rows), m_i.to(tl.float64), mask=in_q)
        tl.store(Lse + 2 * (row0 + rows) + 1, tl.where(empty | overflow, 0.0, log2_sum).to(tl.float64), mask=in_q)
    else:
        tl.store(Lse + row0 + rows, tl.where(empty | overflow, m_i, (m_i + log2_sum) * LN2), mask=in_q)


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
def bwd_dkdv_program(
    pid_n, pid_bh,
    Q, K, V, DO, Lse, Delta, DK, DV, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl,
    sdkb, sdkh, sdkl, sdvb, sdvh, sdvl,
    KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed,
    Hq, Hkv, Lq, Lk, group, scale, scale_log2, threshold, keep_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_START: tl.constexpr,
    HAS_END: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PAIR: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    rows0 = tl.arange(0, BLOCK_M)
    kv_ok = cols < Lk
    kv_mask = kv_ok[:, None] & (dims[None, :] < D)
    k = tl.load(K + b64 * skb + hk64 * skh + cols[:, None].to(tl.int64) * skl + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * svb + hk64 * svh + cols[:, None].to(tl.int64) * svl + dims[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    key_first = pid_n * BLOCK_N
    for g in range(0, group):
        h64 = (hk * group + g).to(tl.int64)
        row0 = (b64 * Hq + h64) * Lq
        for start in range(0, Lq, BLOCK_M):
            rows = start + rows0
            lo, hi, active = _row_ranges(b, rows, Lq, Lk, KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb,
                                         s_enl, MaskLo, MaskHi, HAS_KVLEN, HAS_QLEN, HAS_START, HAS_END, HAS_MASK, CAUSAL)
            meets = active & (lo < key_first + BLOCK_N) & (hi > key_first)
            if tl.max(meets.to(tl.int32)) > 0:  # query blocks whose rows see none of these keys are skipped
                vis = _visible(lo, hi, cols, Mask, smb, sml, b, Lk, HAS_MASK)
                in_q = rows < Lq
                q_mask = in_q[:, None] & (dims[None, :] < D)
                q = tl.load(Q + b64 * sqb + h64 * sqh + rows[:, None].to(tl.int64) * sql + dims[None, :], mask=q_mask, other=0.0)
                do = tl.load(DO + b64 * sdb + h64 * sdh + rows[:, None].to(tl.int64) * sdl + dims[None, :], mask=q_mask, other=0.0)
                lse_hi, lse_lo = _stats_base2(Lse, row0 + rows, active, PAIR)
                delta = tl.load(Delta + row0 + rows, mask=active, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
                p = tl.where(vis, tl.math.exp2((s - lse_hi[:, None]) - lse_lo[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                z = p
                if DROPOUT:
                    keep = _keep(Seed, row0, rows, key_first, threshold, BLOCK_N)
                    z = tl.where(keep, p * keep_scale, 0.0)
                    dp = tl.where(keep, dp * keep_scale, 0.0)
                do_ok = _finite(do)
                dv += tl.dot(tl.trans(z).to(do.dtype), tl.where(do_ok, do, 0.0), input_precision=PRECISION)
                if tl.min(do_ok.to(tl.int32)) == 0:  # rare: a dV entry a visible non-finite dO reaches is NaN
                    dv += tl.where(_hits(tl.trans(vis), do_ok == 0) > 0, float("nan"), 0.0)
                ds = tl.where(vis & (p != 1.0), p * (dp - delta[:, None]), 0.0)  # a saturated row (P = 1) has none
                dk += tl.dot(tl.trans(ds).to(q.dtype), tl.where(_finite(q), q, 0.0), input_precision=PRECISION)
    in_range = (cols[:, None] < Lk) & (dims[None, :] < D)
    tl.store(DK + b64 * sdkb + hk64 * sdkh + cols[:, None].to(tl.int64) * sdkl + dims[None, :], (dk * scale).to(DK.dtype.element_ty), mask=in_range)
    tl.store(DV + b64 * sdvb + hk64 * sdvh + cols[:, None].to(tl.int64) * sdvl + dims[None, :], dv.to(DV.dtype.element_ty), mask=in_range)


@triton.jit
def bwd_dq_program(
    pid_m, pid_bh,
    Q, K, V, DO, Lse, Delta, DQ, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sdqb, sdqh, sdql,
    KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed,
    Hq, Lq, Lk, group, scale, scale_log2, threshold, keep_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_START: tl.constexpr,
    HAS_END: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PAIR: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = pid_bh // Hq
    h = pid_bh % Hq
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), (h // group).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    lo, hi, active = _row_ranges(b, rows, Lq, Lk, KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl,
                                 MaskLo, MaskHi, HAS_KVLEN, HAS_QLEN, HAS_START, HAS_END, HAS_MASK, CAUSAL)
    first = tl.min(tl.where(active, lo, Lk)) // BLOCK_N * BLOCK_N
    last = tl.max(hi)
    dims = tl.arange(0, BLOCK_D)
    in_q = rows < Lq
    q_mask = in_q[:, None] & (dims[None, :] < D)
    q = tl.load(Q + b64 * sqb + h64 * sqh + rows[:, None].to(tl.int64) * sql + dims[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b64 * sdb + h64 * sdh + rows[:, None].to(tl.int64) * sdl + dims[None, :], mask=q_mask, other=0.0)
    row0 = (b64 * Hq + h64) * Lq
    lse_hi, lse_lo = _stats_base2(Lse, row0 + rows, active, PAIR)
    delta = tl.load(Delta + row0 + rows, mask=active, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(first, last, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        vis = _visible(lo, hi, cols, Mask, smb, sml, b, Lk, HAS_MASK)
        if tl.max(vis.to(tl.int32)) > 0:
            kv_mask = (cols[None, :] < Lk) & (dims[:, None] < D)
            kt = tl.load(K + b64 * skb + hk64 * skh + cols[None, :].to(tl.int64) * skl + dims[:, None], mask=kv_mask, other=0.0)
            vt = tl.load(V + b64 * svb + hk64 * svh + cols[None, :].to(tl.int64) * svl + dims[:, None], mask=kv_mask, other=0.0)
            s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
            p = tl.where(vis, tl.math.exp2((s - lse_hi[:, None]) - lse_lo[:, None]), 0.0)
            dp = tl.dot(do, vt, input_precision=PRECISION)
            if DROPOUT:
                dp = tl.where(_keep(Seed, row0, rows, start, threshold, BLOCK_N), dp * keep_scale, 0.0)
            ds = tl.where(vis & (p != 1.0), p * (dp - delta[:, None]), 0.0)
            dq += tl.dot(ds.to(kt.dtype), tl.trans(tl.where(_finite(kt), kt, 0.0)), input_precision=PRECISION)
    tl.store(DQ + b64 * sdqb + h64 * sdqh + rows[:, None].to(tl.int64) * sdql + dims[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=q_mask)


_KEY = ["BLOCK_D", "HAS_MASK", "HAS_START", "CAUSAL", "DROPOUT"]


@triton.autotune(**attention_autotune("fwd", _KEY))
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
    KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed,
    Hq, Lq, Lk, group, scale_log2, threshold, keep_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_START: tl.constexpr,
    HAS_END: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PAIR: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    fwd_program(
        tl.program_id(0), tl.program_id(1),
        Q, K, V, Out, Lse, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
        KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed,
        Hq, Lq, Lk, group, scale_log2, threshold, keep_scale,
        D, BLOCK_D, HAS_KVLEN, HAS_QLEN, HAS_START, HAS_END, HAS_MASK, CAUSAL, DROPOUT, PAIR, PRECISION, BLOCK_M, BLOCK_N,
    )


@triton.autotune(**attention_autotune("dkdv", _KEY))
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl,
    sdkb, sdkh, sdkl, sdvb, sdvh, sdvl,
    KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed,
    Hq, Hkv, Lq, Lk, group, scale, scale_log2, threshold, keep_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_START: tl.constexpr,
    HAS_END: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PAIR: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bwd_dkdv_program(
        tl.program_id(0), tl.program_id(1),
        Q, K, V, DO, Lse, Delta, DK, DV, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl,
        sdkb, sdkh, sdkl, sdvb, sdvh, sdvl,
        KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed,
        Hq, Hkv, Lq, Lk, group, scale, scale_log2, threshold, keep_scale,
        D, BLOCK_D, HAS_KVLEN, HAS_QLEN, HAS_START, HAS_END, HAS_MASK, CAUSAL, DROPOUT, PAIR, PRECISION, BLOCK_M, BLOCK_N,
    )


@triton.autotune(**attention_autotune("dq", _KEY))
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sdqb, sdqh, sdql,
    KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed,
    Hq, Lq, Lk, group, scale, scale_log2, threshold, keep_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_START: tl.constexpr,
    HAS_END: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PAIR: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bwd_dq_program(
        tl.program_id(0), tl.program_id(1),
        Q, K, V, DO, Lse, Delta, DQ, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sdqb, sdqh, sdql,
        KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed,
        Hq, Lq, Lk, group, scale, scale_log2, threshold, keep_scale,
        D, BLOCK_D, HAS_KVLEN, HAS_QLEN, HAS_START, HAS_END, HAS_MASK, CAUSAL, DROPOUT, PAIR, PRECISION, BLOCK_M, BLOCK_N,
    )


# ---- host side

def _mask_bounds(key_padding_mask, Lk):
    """Per batch, the first key the mask leaves visible and one past the last (int32, on the
    device, no host sync): the kernels never visit keys outside them."""
    visible = ~key_padding_mask
    any_visible = visible.any(1)
    first = torch.where(any_visible, visible.int().argmax(1), Lk)
    last = torch.where(any_visible, Lk - visible.flip(1).int().argmax(1), 0)
    return first.to(torch.int32), last.to(torch.int32)


class Visibility:
    """The visibility arguments of one direction, as kernel arguments (pointers with their
    strides; a dummy where absent) and constexpr flags."""

    def __init__(self, q, k, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal, dropout_p, seed):
        dummy = q.new_empty(1, dtype=torch.int32)
        pick = lambda t: t if t is not None else dummy
        stride = lambda t, d: t.stride(d) if t is not None else 0
        Lk = k.shape[2]
        mask_lo, mask_hi = _mask_bounds(key_padding_mask, Lk) if key_padding_mask is not None else (dummy, dummy)
        self.lengths = (pick(kv_lengths), stride(kv_lengths, 0), pick(q_lengths), stride(q_lengths, 0),
                        pick(kv_start), stride(kv_start, 0), stride(kv_start, 1), pick(kv_end), stride(kv_end, 0), stride(kv_end, 1))
        self.mask = (pick(key_padding_mask), stride(key_padding_mask, 0), stride(key_padding_mask, 1), mask_lo, mask_hi,
                     seed if seed is not None else dummy)
        self.dropout = (dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p))
        self.flags = dict(HAS_KVLEN=kv_lengths is not None, HAS_QLEN=q_lengths is not None, HAS_START=kv_start is not None,
                          HAS_END=kv_end is not None, HAS_MASK=key_padding_mask is not None, CAUSAL=bool(causal),
                          DROPOUT=dropout_p > 0)

    def args(self):
        return (*self.lengths, *self.mask)


def common_flags(q):
    return dict(
        D=q.shape[-1],
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
        PAIR=q.dtype == torch.float32,
        # fp32 inputs get fp32 products, not TF32: the same numbers as every other backend.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def new_stats(q):
    shape, dtype = stats_shape(q.dtype, q.shape[:3])
    return torch.empty(shape, dtype=dtype, device=q.device)


def _no_key(stats):
    """The statistics of rows that see no key: max +inf (and log sum 0)."""
    if stats.dim() == 4:
        stats[..., 0], stats[..., 1] = math.inf, 0.0
        return stats
    return stats.fill_(math.inf)


def leading_strides(*tensors):
    return tuple(s for t in tensors for s in t.stride()[:3])


def row_delta(out, grad_out, block_d):
    B, Hq, Lq, D = out.shape
    delta = torch.empty(B, Hq, Lq, dtype=torch.float32, device=out.device)
    block = 64 if not INTERPRET else 16
    _delta_kernel[(triton.cdiv(Lq, block), B * Hq)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], Hq, Lq, D=D, BLOCK_D=block_d, BLOCK_M=block,
    )
    return delta


def cross_attention(q, k, v, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal, dropout_p, seed, scale):
    B, Hq, Lq, D = q.shape
    out = torch.empty_like(q)
    lse = new_stats(q)
    if out.numel() == 0 or k.shape[2] == 0:
        return out.zero_(), _no_key(lse)
    vis = Visibility(q, k, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal, dropout_p, seed)
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)
    _fwd_kernel[grid](q, k, v, out, lse, *leading_strides(q, k, v, out), *vis.args(),
                      Hq, Lq, k.shape[2], Hq // k.shape[1], scale * LOG2E, *vis.dropout,
                      **common_flags(q), **vis.flags)
    return out, lse


def cross_attention_backward(grad_out, q, k, v, out, lse, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal,
                             dropout_p, seed, scale):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    flags = common_flags(q)
    lse = lse.contiguous()
    delta = row_delta(out, grad_out, flags["BLOCK_D"])
    vis = Visibility(q, k, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal, dropout_p, seed)
    group = Hq // Hkv
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * Hkv)](
        q, k, v, grad_out, lse, delta, dk, dv, *leading_strides(q, k, v, grad_out, dk, dv), *vis.args(),
        Hq, Hkv, Lq, Lk, group, scale, scale * LOG2E, *vis.dropout, **flags, **vis.flags)
    _bwd_dq_kernel[lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)](
        q, k, v, grad_out, lse, delta, dq, *leading_strides(q, k, v, grad_out, dq), *vis.args(),
        Hq, Lq, Lk, group, scale, scale * LOG2E, *vis.dropout, **flags, **vis.flags)
    return dq, dk, dv
