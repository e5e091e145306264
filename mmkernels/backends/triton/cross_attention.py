"""Triton cross-attention, FlashAttention-2 style, shaped so that a call pays only for what it
passes.

Forward: a program per (block of BLOCK_M queries, batch x query head). Before its loop it computes
each row's key range (kv_start/kv_end, kv_lengths, causal, and the first/last key the
key_padding_mask leaves) and from them three runs of aligned key tiles: partial tiles, where
some row does not see some key; full tiles, which every row that sees anything sees whole; and
partial tiles again (FlexAttention's full/partial blocks). The full-tile loop is the tutorial's
loop: no visibility mask, no data-dependent branch, no sanitising, so its K/V loads pipeline
(cp.async) and its products run on the widest MMA the target has. Every guarantee is paid for on
the partial tiles only: hidden keys are selected (not multiplied) away there, the products use
copies whose non-finite entries are zeroed, and a visible non-finite value marks the outputs it
reaches NaN. (On a full tile every pair is visible, so a plain product propagates NaN and Inf
exactly where the reference does.) A key_padding_mask may hide any key of any tile, so without
per-row ranges its tiles run one loop of their own (_fwd_masked) where the mask arrives as a
per-key bias, 0 or -inf, added with the scale in one FFMA, and hidden keys' K and V rows load
as 0. The online softmax runs in base 2 (exp2) and fp32; the
statistics saved for the backward are mmkernels.backends.base.stats_shape's: for float32 inputs
the row max and log2 of the row sum apart in float64, for half inputs the natural log-sum-exp
(+inf for rows with no key).

Backward: a preprocess computes delta = rowsum(dO * O); a dK/dV kernel runs per (key block,
batch x kv head) over the query heads of its group (GQA without copies) and the query blocks
whose rows see its keys, in the transposed orientation (keys are the rows of its tiles, so its
probabilities feed the MMAs straight from registers); a dQ kernel runs per (query block, batch x
query head) over the key tiles its rows see. Both split their loops into partial and full runs
as the forward does; without a mask or per-row ranges dK/dV needs no partial blocks at all (a
key's gradient rows depend on its own scores only, so hidden keys' rows are zeroed at the end).
No atomics: deterministic.

Every visibility feature is a compile-time flag, so the plain call compiles to the lean kernel.
Dropout draws Philox numbers exactly as the other backends do (csrc/philox.h). Head dims are
padded to the next power of two inside the kernel (masked loads), not in memory.
"""
import math

import torch
import triton
import triton.language as tl

from mmkernels.backends.base import stats_shape
from mmkernels.backends.reference import dropout_threshold
from mmkernels.backends.triton.config import INTERPRET, autotune

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # a constexpr: kernels may read only those globals
KEY_BIAS_ALIGN = tl.constexpr(256)  # key_bias() rows are padded to a multiple of this, BLOCK_N at most


# ---- visibility


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
def _key_visible(cols, Mask, smb, sml, b, Lk, HAS_MASK: tl.constexpr):
    """(len(cols),): the mask leaves key j (always, without a mask; never past Lk)."""
    if HAS_MASK:
        return tl.load(Mask + b.to(tl.int64) * smb + cols.to(tl.int64) * sml, mask=cols < Lk, other=1) == 0
    return cols < Lk


@triton.jit
def _tile_runs(lo, hi, active, Lk, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """The key tiles (aligned to BLOCK_N) a block of query rows visits: partial tiles in
    [first, full_lo), full tiles in [full_lo, full_hi), partial tiles in [full_hi, last). A full
    tile is one every active row sees whole; with a key_padding_mask any tile may hold a hidden
    key, so every tile is partial."""
    first = tl.min(tl.where(active, lo, Lk)) // BLOCK_N * BLOCK_N  # aligned: dropout draws four keys at a time
    last = tl.max(hi)  # 0 when no row is active
    full_lo = last
    full_hi = last
    if not HAS_MASK:
        lo_max = tl.max(tl.where(active, lo, 0))
        hi_min = tl.min(tl.where(active, hi, Lk))
        aligned_lo = tl.cdiv(lo_max, BLOCK_N) * BLOCK_N
        aligned_hi = hi_min // BLOCK_N * BLOCK_N
        has_full = (last > 0) & (aligned_hi > aligned_lo)
        full_lo = tl.where(has_full, aligned_lo, last)
        full_hi = tl.where(has_full, aligned_hi, last)
    return first, full_lo, full_hi, last


@triton.jit
def _keep(Seed, row0, rows, col0, threshold, BLOCK_N: tl.constexpr):
    """Dropout's keep mask (rows, BLOCK_N) for query rows (their (b * Hq + h) * Lq + i index
    starts at row0) and keys col0 + arange(BLOCK_N), col0 a multiple of 4: Philox4x32-10 with
    counter (row, row >> 32, j >> 2, 0), output j & 3. One Philox call serves four keys, so it runs
    on a (rows, BLOCK_N / 4) tile and its four outputs are interleaved back into key order."""
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
def _keep_t(Seed, row0, rows, col0, threshold, BLOCK_N: tl.constexpr):
    """_keep transposed, (BLOCK_N, rows), drawn in that layout: the dK/dV kernel's tiles have the
    keys as rows. Output e of the call for key group g lands on key 4 g + e."""
    seed = tl.load(Seed)
    row = row0 + rows.to(tl.int64)
    zero = tl.zeros([BLOCK_N // 4, rows.shape[0]], tl.uint32)
    c0 = (row & 0xFFFFFFFF).to(tl.uint32)[None, :] + zero
    c1 = (row >> 32).to(tl.uint32)[None, :] + zero
    c2 = ((col0 >> 2) + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)[:, None] + zero
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, zero)
    # [g, i, y, x] = output 2 y + x of group g; keys 4 g + 2 y + x after the permute
    quads = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    draw = tl.reshape(tl.permute(quads, (0, 2, 3, 1)), (BLOCK_N, rows.shape[0]))
    return draw.to(tl.int64) >= threshold


@triton.jit
def _finite(x):
    return (x == x) & (tl.abs(x) != float("inf"))


@triton.jit
def _split_pid(L, BLOCK: tl.constexpr):
    """(block, batch x head) of this program: the grids are one axis of cdiv(L, BLOCK) * B * H
    programs (a second axis would stop at 65,535 batches x heads), blocks of one head adjacent
    so that they share its K/V in L2."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(L, BLOCK)
    return pid % blocks, pid // blocks


@triton.jit
def _nonfinite_rows_kernel(X, Bad, sxb, sxh, sxl, H, L, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """Bad[(b * H + h) * L + i] = whether row i of X[b, h] holds a non-finite value. The pairwise
    kernels read these flags instead of testing every element of every tile in registers."""
    pid_l, pid_bh = _split_pid(L, BLOCK_L)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    dims = tl.arange(0, BLOCK_D)
    x = tl.load(X + b * sxb + h * sxh + rows[:, None].to(tl.int64) * sxl + dims[None, :],
                mask=(rows[:, None] < L) & (dims[None, :] < D), other=0.0)
    bad = tl.max((_finite(x) == 0).to(tl.int8), 1)
    tl.store(Bad + pid_bh.to(tl.int64) * L + rows, bad, mask=rows < L)


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
def _probs(s, m, log_sum, PAIR: tl.constexpr):
    """exp2 of base-2 scores against the saved statistics (rows along axis 0 or 1 as the caller
    broadcast them)."""
    if PAIR:
        return tl.math.exp2((s - m) - log_sum)
    return tl.math.exp2(s - m)


# ---- loads: 64-bit offsets, head dims padded to BLOCK_D in registers only


@triton.jit
def _rows_ptrs(base, idx, stride, dims):
    """(len(idx), BLOCK_D) pointers to rows idx of a row-major operand."""
    return base + idx[:, None].to(tl.int64) * stride + dims[None, :]


@triton.jit
def _cols_ptrs(base, idx, stride, dims):
    """(BLOCK_D, len(idx)): the same rows, transposed."""
    return base + idx[None, :].to(tl.int64) * stride + dims[:, None]


@triton.jit
def _load(ptrs, rows_ok, dims_ok, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """A tile whose rows outside rows_ok and dims past D read as 0 (both masks already
    broadcastable to the tile)."""
    if D == BLOCK_D:
        return tl.load(ptrs, mask=rows_ok, other=0.0)
    return tl.load(ptrs, mask=rows_ok & dims_ok, other=0.0)


@triton.jit
def _load_whole(ptrs, dims_ok, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """A tile of rows all in bounds (a full tile's): no mask at all unless the head dim is padded."""
    if D == BLOCK_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=dims_ok, other=0.0)


# ---- forward


@triton.jit
def _fwd_full(acc, m_i, l_i, q, kt_ptrs, v_ptrs, skl, svl, t0, t1, dims, rows, Seed, row0, threshold, keep_scale,
              scale_log2, D: tl.constexpr, BLOCK_D: tl.constexpr, DROPOUT: tl.constexpr, POS_SCALE: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles [t0, t1) that every active row sees whole: the tutorial's loop."""
    for start in range(t0, t1, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        kt = _load_whole(kt_ptrs + start.to(tl.int64) * skl, (dims < D)[:, None], D, BLOCK_D)
        qk = tl.dot(q, kt, input_precision=PRECISION)
        if POS_SCALE:  # max(qk) * scale is max(qk * scale): one FFMA per score below
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # scores that overflowed to -inf
            p = tl.math.exp2(qk * scale_log2 - m_safe[:, None])
        else:
            s = qk * scale_log2
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(Seed, row0, rows, start, threshold, BLOCK_N), p * keep_scale, 0.0)
        v = _load_whole(v_ptrs + start.to(tl.int64) * svl, (dims < D)[None, :], D, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _keep_row(Seed, row, cols, threshold):
    """Dropout's keep flags of one query row (its (b * Hq + h) * Lq + i index) for the keys cols."""
    zero = tl.zeros(cols.shape, tl.uint32)
    r0, r1, r2, r3 = tl.philox(tl.load(Seed), (row & 0xFFFFFFFF).to(tl.uint32) + zero, (row >> 32).to(tl.uint32) + zero,
                               (cols >> 2).to(tl.uint32), zero)
    e = cols & 3
    draw = tl.where(e == 0, r0, tl.where(e == 1, r1, tl.where(e == 2, r2, r3)))
    return draw.to(tl.int64) >= threshold


@triton.jit
def _add_bad_keys(acc, q, k_base, v_base, v_bad, skl, svl, j0, j1, lo, hi, m, dims, rows, Mask, smb, sml, b, Lk, Seed, row0,
                  threshold, keep_scale, scale_log2, D: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr):
    """The rare path of the pairwise forward: keys in [j0, j1) whose V row holds a non-finite value
    were left out of their partial tiles' products. Each one is added back to the rows that see
    it, one key at a time (no second accumulator): its probability recomputed against the final
    row max m, its finite entries weighted by it, its non-finite ones as NaN."""
    for jj in range(0, j1 - j0):
        j = j0 + jj  # a tensor (so that .to works) in the interpreter too
        if tl.load(v_bad + j) != 0:
            k_row = tl.load(k_base + j.to(tl.int64) * skl + dims, mask=dims < D, other=0.0).to(tl.float32)
            v_row = tl.load(v_base + j.to(tl.int64) * svl + dims, mask=dims < D, other=0.0).to(tl.float32)
            sees = (j >= lo) & (j < hi)
            if HAS_MASK:
                sees = sees & (tl.load(Mask + b.to(tl.int64) * smb + j.to(tl.int64) * sml) == 0)
            p = tl.math.exp2(tl.sum(q * k_row[None, :], 1) * scale_log2 - m)
            if DROPOUT:
                p = tl.where(_keep_row(Seed, row0 + rows.to(tl.int64), j + tl.zeros(rows.shape, tl.int32), threshold),
                             p * keep_scale, 0.0)
            ok = _finite(v_row)
            acc += tl.where(sees[:, None], p[:, None] * tl.where(ok, v_row, 0.0)[None, :], 0.0)
            acc = tl.where(sees[:, None] & (ok == 0)[None, :], float("nan"), acc)
    return acc


@triton.jit
def _softmax_step(s, m_i, l_i, Seed, row0, rows, start, threshold, keep_scale, DROPOUT: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """One key tile of the online softmax over base-2 scores s (-inf where hidden): its
    probabilities (dropout applied), the rescale of what came before, the new row max and sum."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(_keep(Seed, row0, rows, start, threshold, BLOCK_N), p * keep_scale, 0.0)
    return p, alpha, m_new, l_i


@triton.jit
def _fwd_partial(acc, m_i, l_i, seen, bad_seen, q, k_base, v_base, v_bad, skl, svl, t0, t1, lo, hi, key_lo, key_hi, dims,
                 rows, Mask, smb, sml, b, Lk, Seed, row0, threshold, keep_scale, scale_log2, D: tl.constexpr,
                 BLOCK_D: tl.constexpr, HAS_START: tl.constexpr, HAS_MASK: tl.constexpr, PAIRWISE: tl.constexpr,
                 DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles [t0, t1) where some active row does not see some key. The scores of hidden keys
    are selected away (their K rows are read, in bounds: a select, unlike a product, drops NaN),
    and the V rows of keys outside [key_lo, key_hi) or hidden by the mask load as 0, so whatever
    they hold reaches nothing. Without PAIRWISE every active row sees the same
    keys, so that is all. PAIRWISE (per-row ranges, causal): a key may be seen by one row and not
    by another, whose exact-0 probability would meet it in the product; so V rows that hold a
    non-finite value (v_bad, flagged before the launch) load as 0 too, bad_seen records that this
    happened, and the program adds those keys back at its end (_add_bad_keys). A tile no row's
    range meets is skipped."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(t0, t1, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        cols = start + offs_n
        key_ok = _key_visible(cols, Mask, smb, sml, b, Lk, HAS_MASK) & (cols >= key_lo) & (cols < key_hi)
        if PAIRWISE:
            vis = (cols[None, :] < hi[:, None]) & key_ok[None, :]
            if HAS_START:  # else lo is 0 or the mask's first visible key, below which key_ok is false
                vis = vis & (cols[None, :] >= lo[:, None])
            meets = tl.max(((lo < start + BLOCK_N) & (hi > start)).to(tl.int32)) > 0
        else:  # every active row sees the keys key_ok marks; no skip, which would make ptxas serialise
            vis = key_ok[None, :]  # every wgmma of the kernel (C7515)
            meets = True
        if meets:
            # pointers made per tile, so that none are live across the loop (hoisted ones spilled)
            kt = _load(_cols_ptrs(k_base, cols, skl, dims), (cols < Lk)[None, :], (dims < D)[:, None], D, BLOCK_D)
            s = tl.where(vis, tl.dot(q, kt, input_precision=PRECISION) * scale_log2, float("-inf"))
            if HAS_MASK and PAIRWISE:
                seen = tl.maximum(seen, tl.max(vis.to(tl.int32), 1))
            p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i, Seed, row0, rows, start, threshold, keep_scale, DROPOUT, BLOCK_N)
            v_ok = key_ok
            if PAIRWISE:
                bad = tl.load(v_bad + cols, mask=key_ok, other=0) != 0
                v_ok = key_ok & ~bad
                bad_seen = tl.maximum(bad_seen, tl.max(bad.to(tl.int32)))
            v = _load(_rows_ptrs(v_base, cols, svl, dims), v_ok[:, None], (dims < D)[None, :], D, BLOCK_D)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
    return acc, m_i, l_i, seen, bad_seen


@triton.jit
def _fwd_masked(acc, m_i, l_i, q, kt_ptrs, v_ptrs, key_bias, skl, svl, t0, t1, dims, rows, Seed, row0, threshold, keep_scale,
                scale_log2, D: tl.constexpr, BLOCK_D: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Key tiles [t0, t1) under a key_padding_mask that every active row shares (no per-row
    ranges): key_bias is the batch's row of key_bias()'s tensor, 0 for a visible key and -inf for
    a hidden one. The mask costs an add per score, fused with the scale, and a predicate per
    loaded K/V row: hidden keys load as 0, so their scores are a finite 0 plus -inf (never NaN)
    and their V rows meet their zero probabilities as zeros."""
    tl.static_assert(BLOCK_N <= KEY_BIAS_ALIGN)
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(t0, t1, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        bias = tl.load(key_bias + start + offs_n)  # padded to KEY_BIAS_ALIGN: no bounds test
        key_ok = bias == 0.0
        kt = _load(kt_ptrs + start.to(tl.int64) * skl, key_ok[None, :], (dims < D)[:, None], D, BLOCK_D)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2 + bias[None, :]
        p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i, Seed, row0, rows, start, threshold, keep_scale, DROPOUT, BLOCK_N)
        v = _load(v_ptrs + start.to(tl.int64) * svl, key_ok[:, None], (dims < D)[None, :], D, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def fwd_program(
    pid_m, pid_bh,
    Q, K, V, Out, Lse, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
    KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed, BadV,
    KeyBias, s_kbb, Hq, Lq, Lk, group, scale_log2, threshold, keep_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_START: tl.constexpr,
    HAS_END: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PAIR: tl.constexpr,
    POS_SCALE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = pid_bh // Hq
    h = pid_bh % Hq
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), (h // group).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    lo, hi, active = _row_ranges(b, rows, Lq, Lk, KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl,
                                 MaskLo, MaskHi, HAS_KVLEN, HAS_QLEN, HAS_START, HAS_END, HAS_MASK, CAUSAL)
    first, full_lo, full_hi, last = _tile_runs(lo, hi, active, Lk, BLOCK_N, HAS_MASK)
    dims = tl.arange(0, BLOCK_D)
    in_q = rows < Lq
    q = _load(_rows_ptrs(Q + b64 * sqb + h64 * sqh, rows, sql, dims), in_q[:, None], (dims < D)[None, :], D, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    seen = tl.zeros([BLOCK_M], tl.int32)
    bad_seen = 0
    k_base = K + b64 * skb + hk64 * skh
    v_base = V + b64 * svb + hk64 * svh
    row0 = (b64 * Hq + h64) * Lq
    key_lo, key_hi = tl.min(tl.where(active, lo, Lk)), last  # the keys some active row sees lie in [key_lo, key_hi)
    PAIRWISE: tl.constexpr = HAS_START or HAS_END or CAUSAL
    v_bad = BadV + (b64 * (Hq // group) + hk64) * Lk
    offs_n = tl.arange(0, BLOCK_N)
    if HAS_MASK and not PAIRWISE:  # every tile may hide any key: one run, the mask as a bias
        acc, m_i, l_i = _fwd_masked(acc, m_i, l_i, q, _cols_ptrs(k_base, offs_n, skl, dims), _rows_ptrs(v_base, offs_n, svl, dims),
                                    KeyBias + b64 * s_kbb, skl, svl, first, last, dims, rows, Seed, row0, threshold,
                                    keep_scale, scale_log2, D, BLOCK_D, DROPOUT, PRECISION, BLOCK_N)
    else:
        acc, m_i, l_i, seen, bad_seen = _fwd_partial(acc, m_i, l_i, seen, bad_seen, q, k_base, v_base, v_bad, skl, svl, first,
                                                     tl.minimum(full_lo, last), lo, hi, key_lo, key_hi, dims, rows, Mask, smb,
                                                     sml, b, Lk, Seed, row0, threshold, keep_scale, scale_log2, D, BLOCK_D,
                                                     HAS_START, HAS_MASK, PAIRWISE, DROPOUT, PRECISION, BLOCK_N)
        # the full loop's pointers are made after the partial run: they are not live across it
        acc, m_i, l_i = _fwd_full(acc, m_i, l_i, q, _cols_ptrs(k_base, offs_n, skl, dims), _rows_ptrs(v_base, offs_n, svl, dims),
                                  skl, svl, full_lo, full_hi, dims, rows, Seed, row0, threshold, keep_scale, scale_log2, D,
                                  BLOCK_D, DROPOUT, POS_SCALE, PRECISION, BLOCK_N)
        acc, m_i, l_i, seen, bad_seen = _fwd_partial(acc, m_i, l_i, seen, bad_seen, q, k_base, v_base, v_bad, skl, svl, full_hi,
                                                     last, lo, hi, key_lo, key_hi, dims, rows, Mask, smb, sml, b, Lk, Seed,
                                                     row0, threshold, keep_scale, scale_log2, D, BLOCK_D, HAS_START, HAS_MASK,
                                                     PAIRWISE, DROPOUT, PRECISION, BLOCK_N)
    if PAIRWISE:
        if bad_seen > 0:  # rare: visible non-finite values of V on partial tiles
            q32 = _load(_rows_ptrs(Q + b64 * sqb + h64 * sqh, rows, sql, dims), in_q[:, None], (dims < D)[None, :], D,
                        BLOCK_D).to(tl.float32)
            m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
            acc = _add_bad_keys(acc, q32, k_base, v_base, v_bad, skl, svl, first, tl.minimum(full_lo, last), lo, hi, m_safe,
                                dims, rows, Mask, smb, sml, b, Lk, Seed, row0, threshold, keep_scale, scale_log2, D,
                                HAS_MASK, DROPOUT)
            acc = _add_bad_keys(acc, q32, k_base, v_base, v_bad, skl, svl, full_hi, last, lo, hi, m_safe,
                                dims, rows, Mask, smb, sml, b, Lk, Seed, row0, threshold, keep_scale, scale_log2, D,
                                HAS_MASK, DROPOUT)
    if HAS_MASK and PAIRWISE:  # the mask may hide every key of a row's own range
        empty = seen == 0
    else:  # an active row sees at least the first key of its range
        empty = active == 0
    _finish(acc, m_i, l_i, empty, Out, _rows_ptrs(b64 * sob + h64 * soh, rows, sol, dims), in_q[:, None] & (dims[None, :] < D),
            Lse, row0 + rows, in_q, PAIR)


@triton.jit
def _finish(acc, m_i, l_i, empty, Out, out_offsets, out_mask, Lse, lse_rows, row_ok, PAIR: tl.constexpr):
    """Normalise a block of output rows and store them (at Out + out_offsets) with their statistics (rows lse_rows of
    the flattened (B, Hq, Lq)): rows that see no key get 0 and max +inf (P = 0 in the backward),
    rows whose visible scores all overflowed get NaN, not a silent 0."""
    overflow = (l_i == 0.0) & ~empty
    out = tl.where(empty[:, None], 0.0, acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None])
    out = tl.where(overflow[:, None], float("nan"), out)
    log2_sum = tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i))
    m_i = tl.where(empty, float("inf"), tl.where(overflow, float("-inf"), m_i))
    tl.store(Out + out_offsets, out.to(Out.dtype.element_ty), mask=out_mask)
    if PAIR:  # the max and the log of the sum apart (mmkernels.backends.base.stats_shape), base 2
        tl.store(Lse + 2 * lse_rows, m_i.to(tl.float64), mask=row_ok)
        tl.store(Lse + 2 * lse_rows + 1, tl.where(empty | overflow, 0.0, log2_sum).to(tl.float64), mask=row_ok)
    else:
        tl.store(Lse + lse_rows, tl.where(empty | overflow, m_i, (m_i + log2_sum) * LN2), mask=row_ok)


@triton.jit
def _delta_kernel(O, DO, Delta, sob, soh, sol, sdb, sdh, sdl, Hq, Lq,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m, pid_bh = _split_pid(Lq, BLOCK_M)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < Lq) & (dims[None, :] < D)
    o = tl.load(_rows_ptrs(O + b * sob + h * soh, rows, sol, dims), mask=mask, other=0.0)
    do = tl.load(_rows_ptrs(DO + b * sdb + h * sdh, rows, sdl, dims), mask=mask, other=0.0)
    tl.store(Delta + pid_bh.to(tl.int64) * Lq + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < Lq)


# ---- backward: dK and dV, keys as the rows of every tile


@triton.jit
def _dkdv_full(dk, dv, k, v, q_base, do_base, sql, sdl, Lse, Delta, row0, m0, m1, Lq, dims, key0, Seed, threshold,
               keep_scale, scale_log2, D: tl.constexpr, BLOCK_D: tl.constexpr, DROPOUT: tl.constexpr,
               PAIR: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query blocks [m0, m1) whose every row (inside Lq) sees every key of the block."""
    offs_m = tl.arange(0, BLOCK_M)
    qt_ptrs = _cols_ptrs(q_base, offs_m, sql, dims)
    do_ptrs = _rows_ptrs(do_base, offs_m, sdl, dims)
    for start in range(m0, m1, BLOCK_M):
        start = tl.multiple_of(start, BLOCK_M)
        rows = start + offs_m
        in_q = rows < Lq
        qt = _load(qt_ptrs + start.to(tl.int64) * sql, in_q[None, :], (dims < D)[:, None], D, BLOCK_D)
        do = _load(do_ptrs + start.to(tl.int64) * sdl, in_q[:, None], (dims < D)[None, :], D, BLOCK_D)
        m, log_sum = _stats_base2(Lse, row0 + rows, in_q, PAIR)
        delta = tl.load(Delta + row0 + rows, mask=in_q, other=0.0)
        pt = _probs(tl.dot(k, qt, input_precision=PRECISION) * scale_log2, m[None, :], log_sum[None, :], PAIR)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        zt = pt
        if DROPOUT:
            keep = _keep_t(Seed, row0, rows, key0, threshold, BLOCK_N)
            zt = tl.where(keep, pt * keep_scale, 0.0)
            dpt = tl.where(keep, dpt * keep_scale, 0.0)
        dv = tl.dot(zt.to(do.dtype), do, dv, input_precision=PRECISION)
        dst = tl.where(pt != 1.0, pt * (dpt - delta[None, :]), 0.0)  # a saturated row (P = 1) has none
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _add_bad_rows(dv, k, key_ok, q_base, do_base, sql, sdl, Lse, BadDO, row0, i0, i1, cols, b, Lq, Lk, KvLen, s_kvl, QLen,
                  s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, MaskLo, MaskHi, Seed, threshold, keep_scale, scale_log2,
                  dims, D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_START: tl.constexpr,
                  HAS_END: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                  PAIR: tl.constexpr):
    """The rare path of the pairwise dK/dV: query rows in [i0, i1) whose dO holds a non-finite value
    were left out of their partial blocks' dV products. Each one is added back to the keys that
    see it, one row at a time (no second accumulator): its probabilities recomputed, its finite dO
    entries weighted by them, its non-finite ones as NaN."""
    for i in range(i0, i1):
        row = i + tl.arange(0, 1)
        lo, hi, active = _row_ranges(b, row, Lq, Lk, KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl,
                                     MaskLo, MaskHi, HAS_KVLEN, HAS_QLEN, HAS_START, HAS_END, HAS_MASK, CAUSAL)
        bad = tl.load(BadDO + row0 + row, mask=active, other=0) != 0
        if tl.max(bad.to(tl.int32)) > 0:
            q_row = tl.load(q_base + row.to(tl.int64) * sql + dims, mask=dims < D, other=0.0).to(tl.float32)
            do_row = tl.load(do_base + row.to(tl.int64) * sdl + dims, mask=dims < D, other=0.0).to(tl.float32)
            m, log_sum = _stats_base2(Lse, row0 + row, active, PAIR)
            sees = key_ok & (cols >= lo) & (cols < hi) & active
            p = _probs(tl.sum(k * q_row[None, :], 1) * scale_log2, m, log_sum, PAIR)
            if DROPOUT:
                p = tl.where(_keep_row(Seed, row0 + row.to(tl.int64), cols, threshold), p * keep_scale, 0.0)
            ok = _finite(do_row)
            dv += tl.where(sees[:, None], p[:, None] * tl.where(ok, do_row, 0.0)[None, :], 0.0)
            dv = tl.where(sees[:, None] & (ok == 0)[None, :], float("nan"), dv)
    return dv


@triton.jit
def _dkdv_partial(dk, dv, bad_seen, k, v, q_base, do_base, sql, sdl, Lse, Delta, BadQ, BadDO, row0, m0, m1, dims, key0, cols, key_ok,
                  b, Lq, Lk, KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, MaskLo, MaskHi,
                  Seed, threshold, keep_scale, scale_log2, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_START: tl.constexpr, HAS_END: tl.constexpr,
                  HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, PAIRWISE: tl.constexpr, DROPOUT: tl.constexpr,
                  PAIR: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query blocks [m0, m1) where some (row, key) pair is hidden. Rows that see nothing are never
    read (they load as 0, with P = 0), nor are keys no row sees (key_ok, when k and v were loaded),
    and their probabilities are selected away. PAIRWISE (per-row ranges, causal): a row may see one
    key and not another, so the Q and dO rows that hold a non-finite value (flagged before the
    launch) load as 0 too; bad_seen records that a key saw such a dO row, which the program adds
    back at its end (_add_bad_rows), and a visible non-finite Q reaches its keys through the NaN
    statistics of its row. Blocks whose rows see none of these keys are skipped."""
    offs_m = tl.arange(0, BLOCK_M)
    for start in range(m0, m1, BLOCK_M):
        rows = start + offs_m
        lo, hi, active = _row_ranges(b, rows, Lq, Lk, KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl,
                                     MaskLo, MaskHi, HAS_KVLEN, HAS_QLEN, HAS_START, HAS_END, HAS_MASK, CAUSAL)
        if PAIRWISE:
            vist = (cols[:, None] < hi[None, :]) & key_ok[:, None]
            if HAS_START:  # as in _fwd_partial
                vist = vist & (cols[:, None] >= lo[None, :])
            meets = tl.max((active & (lo < key0 + BLOCK_N) & (hi > key0)).to(tl.int32)) > 0
        else:  # every active row sees the keys key_ok marks
            vist = key_ok[:, None]
            meets = True
        if meets:
            q_ok = active
            do_ok = active
            if PAIRWISE:
                do_bad = tl.load(BadDO + row0 + rows, mask=active, other=0) != 0
                q_ok = active & (tl.load(BadQ + row0 + rows, mask=active, other=0) == 0)
                do_ok = active & ~do_bad
            qt = _load(_cols_ptrs(q_base, rows, sql, dims), q_ok[None, :], (dims < D)[:, None], D, BLOCK_D)
            do = _load(_rows_ptrs(do_base, rows, sdl, dims), do_ok[:, None], (dims < D)[None, :], D, BLOCK_D)
            m, log_sum = _stats_base2(Lse, row0 + rows, active, PAIR)
            delta = tl.load(Delta + row0 + rows, mask=active, other=0.0)
            st = tl.dot(k, qt, input_precision=PRECISION) * scale_log2
            pt = tl.where(vist, _probs(st, m[None, :], log_sum[None, :], PAIR), 0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            zt = pt
            if DROPOUT:
                keep = _keep_t(Seed, row0, rows, key0, threshold, BLOCK_N)
                zt = tl.where(keep, pt * keep_scale, 0.0)
                dpt = tl.where(keep, dpt * keep_scale, 0.0)
            dst = tl.where(vist & (pt != 1.0), pt * (dpt - delta[None, :]), 0.0)  # a saturated row (P = 1) has none
            dv = tl.dot(zt.to(do.dtype), do, dv, input_precision=PRECISION)
            dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
            if PAIRWISE:
                bad_seen = tl.maximum(bad_seen, tl.max(do_bad.to(tl.int32)))
    return dk, dv, bad_seen


@triton.jit
def bwd_dkdv_program(
    pid_n, pid_bh,
    Q, K, V, DO, Lse, Delta, BadQ, BadDO, DK, DV, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl,
    sdkb, sdkh, sdkl, sdvb, sdvh, sdvl,
    KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed,
    Hq, Hkv, Lq, Lk, group, scale, scale_log2, threshold, keep_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_START: tl.constexpr,
    HAS_END: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PAIR: tl.constexpr,
    POS_SCALE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)
    key0 = pid_n * BLOCK_N
    cols = key0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    in_k = cols < Lk
    q_len = Lq
    if HAS_QLEN:
        q_len = tl.minimum(tl.maximum(tl.load(QLen + b * s_ql), 0), Lq)
    kv_len = Lk
    if HAS_KVLEN:
        kv_len = tl.minimum(tl.maximum(tl.load(KvLen + b * s_kvl), 0), Lk)
    key_ok = _key_visible(cols, Mask, smb, sml, b, Lk, HAS_MASK) & (cols < kv_len)  # the keys some row may see
    k = _load(_rows_ptrs(K + b64 * skb + hk64 * skh, cols, skl, dims), key_ok[:, None], (dims < D)[None, :], D, BLOCK_D)
    v = _load(_rows_ptrs(V + b64 * svb + hk64 * svh, cols, svl, dims), key_ok[:, None], (dims < D)[None, :], D, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # The query blocks to visit, [m_lo, m_hi), and among them those whose every row sees every
    # key of this block, [full_lo, full_hi): known from the per-batch facts alone, unless per-row
    # ranges or a mask make every block partial.
    m_lo = 0
    full_lo = 0
    if CAUSAL:  # row i sees key j when i >= j - (Lk - Lq)
        m_lo = tl.maximum(key0 - (Lk - Lq), 0) // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(tl.minimum(key0 + BLOCK_N, Lk) - 1 - (Lk - Lq), 0), BLOCK_M) * BLOCK_M
    m_hi = tl.where(tl.max(key_ok.to(tl.int32)) > 0, q_len, m_lo)  # keys no query sees: nothing to visit
    if HAS_QLEN:
        full_hi = q_len // BLOCK_M * BLOCK_M  # past q_lengths, rows hold what they hold
    else:
        full_hi = tl.cdiv(Lq, BLOCK_M) * BLOCK_M  # past Lq, rows read as 0 and weigh nothing
    has_full = (full_hi > full_lo) & (m_hi > m_lo)
    if HAS_KVLEN:  # past kv_lengths, keys hold what they hold; past Lk they read as 0 and their rows are not stored
        has_full = has_full & (key0 + BLOCK_N <= kv_len)
    if HAS_START or HAS_END or HAS_MASK:
        has_full = has_full & (key0 < 0)
    full_lo = tl.where(has_full, tl.maximum(full_lo, m_lo), m_hi)
    full_hi = tl.where(has_full, full_hi, m_hi)

    PAIRWISE: tl.constexpr = HAS_START or HAS_END or CAUSAL
    bad_seen = 0
    for g in range(0, group):
        h64 = (hk * group + g).to(tl.int64)
        row0 = (b64 * Hq + h64) * Lq
        q_base = Q + b64 * sqb + h64 * sqh
        do_base = DO + b64 * sdb + h64 * sdh
        if not (PAIRWISE or HAS_MASK):
            # Every row below q_len sees every key of key_ok, and a key's dK/dV row depends on its own
            # scores only: one loop of full blocks, with rows past q_len loaded as 0 (P = 0) and the
            # rows of hidden keys set to 0 at the end. No partial blocks, so no registers for them.
            dk, dv = _dkdv_full(dk, dv, k, v, q_base, do_base, sql, sdl, Lse, Delta, row0, 0, m_hi, q_len, dims, key0,
                                Seed, threshold, keep_scale, scale_log2, D, BLOCK_D, DROPOUT, PAIR, PRECISION, BLOCK_M,
                                BLOCK_N)
        else:
            dk, dv, bad_seen = _dkdv_partial(dk, dv, bad_seen, k, v, q_base, do_base, sql, sdl, Lse, Delta, BadQ, BadDO, row0, m_lo, tl.minimum(full_lo, m_hi),
                                   dims, key0, cols, key_ok, b, Lq, Lk, KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl,
                                   End, s_enb, s_enl, MaskLo, MaskHi, Seed, threshold, keep_scale, scale_log2, D, BLOCK_D,
                                   HAS_KVLEN, HAS_QLEN, HAS_START, HAS_END, HAS_MASK, CAUSAL, PAIRWISE, DROPOUT, PAIR,
                                   PRECISION, BLOCK_M, BLOCK_N)
            dk, dv = _dkdv_full(dk, dv, k, v, q_base, do_base, sql, sdl, Lse, Delta, row0, full_lo, full_hi, Lq, dims, key0,
                                Seed, threshold, keep_scale, scale_log2, D, BLOCK_D, DROPOUT, PAIR, PRECISION, BLOCK_M,
                                BLOCK_N)
            dk, dv, bad_seen = _dkdv_partial(dk, dv, bad_seen, k, v, q_base, do_base, sql, sdl, Lse, Delta, BadQ, BadDO, row0,
                                             full_hi, m_hi, dims, key0, cols, key_ok, b, Lq, Lk, KvLen, s_kvl, QLen, s_ql,
                                             Start, s_stb, s_stl, End, s_enb, s_enl, MaskLo, MaskHi, Seed, threshold,
                                             keep_scale, scale_log2, D, BLOCK_D, HAS_KVLEN, HAS_QLEN, HAS_START, HAS_END,
                                             HAS_MASK, CAUSAL, PAIRWISE, DROPOUT, PAIR, PRECISION, BLOCK_M, BLOCK_N)
    if PAIRWISE:
        if bad_seen > 0:  # rare: visible non-finite values of dO on partial blocks
            k32 = _load(_rows_ptrs(K + b64 * skb + hk64 * skh, cols, skl, dims), key_ok[:, None], (dims < D)[None, :], D,
                        BLOCK_D).to(tl.float32)
            for g in range(0, group):
                h64 = (hk * group + g).to(tl.int64)
                row0 = (b64 * Hq + h64) * Lq
                q_base = Q + b64 * sqb + h64 * sqh
                do_base = DO + b64 * sdb + h64 * sdh
                dv = _add_bad_rows(dv, k32, key_ok, q_base, do_base, sql, sdl, Lse, BadDO, row0, m_lo,
                                   tl.minimum(full_lo, m_hi), cols, b, Lq, Lk, KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl,
                                   End, s_enb, s_enl, MaskLo, MaskHi, Seed, threshold, keep_scale, scale_log2, dims, D,
                                   HAS_KVLEN, HAS_QLEN, HAS_START, HAS_END, HAS_MASK, CAUSAL, DROPOUT, PAIR)
                dv = _add_bad_rows(dv, k32, key_ok, q_base, do_base, sql, sdl, Lse, BadDO, row0, full_hi, m_hi,
                                   cols, b, Lq, Lk, KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl,
                                   End, s_enb, s_enl, MaskLo, MaskHi, Seed, threshold, keep_scale, scale_log2, dims, D,
                                   HAS_KVLEN, HAS_QLEN, HAS_START, HAS_END, HAS_MASK, CAUSAL, DROPOUT, PAIR)
    in_range = in_k[:, None] & (dims[None, :] < D)
    # Hidden keys get exactly 0: a visible row's non-finite dO times their zero probabilities is NaN.
    dk = tl.where(key_ok[:, None], dk, 0.0)
    dv = tl.where(key_ok[:, None], dv, 0.0)
    tl.store(_rows_ptrs(DK + b64 * sdkb + hk64 * sdkh, cols, sdkl, dims), (dk * scale).to(DK.dtype.element_ty), mask=in_range)
    tl.store(_rows_ptrs(DV + b64 * sdvb + hk64 * sdvh, cols, sdvl, dims), dv.to(DV.dtype.element_ty), mask=in_range)


# ---- backward: dQ


@triton.jit
def _dq_full(dq, q, do, m, log_sum, delta, kt_ptrs, vt_ptrs, skl, svl, t0, t1, dims, rows, Seed, row0, threshold,
             keep_scale, scale_log2, D: tl.constexpr, BLOCK_D: tl.constexpr, DROPOUT: tl.constexpr, PAIR: tl.constexpr,
             PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    for start in range(t0, t1, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        kt = _load_whole(kt_ptrs + start.to(tl.int64) * skl, (dims < D)[:, None], D, BLOCK_D)
        vt = _load_whole(vt_ptrs + start.to(tl.int64) * svl, (dims < D)[:, None], D, BLOCK_D)
        p = _probs(tl.dot(q, kt, input_precision=PRECISION) * scale_log2, m[:, None], log_sum[:, None], PAIR)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        if DROPOUT:
            dp = tl.where(_keep(Seed, row0, rows, start, threshold, BLOCK_N), dp * keep_scale, 0.0)
        ds = tl.where(p != 1.0, p * (dp - delta[:, None]), 0.0)
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_partial(dq, q, do, m, log_sum, delta, k_base, v_base, k_bad, skl, svl, t0, t1, lo, hi, key_lo, key_hi, dims, rows, Mask,
                smb, sml, b, Lk, Seed, row0, threshold, keep_scale, scale_log2, D: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_START: tl.constexpr, HAS_MASK: tl.constexpr, PAIRWISE: tl.constexpr, DROPOUT: tl.constexpr,
                PAIR: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """The forward's partial tiles, for dQ: keys no row sees load as 0; PAIRWISE, so do the K rows
    flagged non-finite (a visible one reaches dQ through the NaN statistics of the rows that see it)."""
    for start in range(t0, t1, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        key_ok = _key_visible(cols, Mask, smb, sml, b, Lk, HAS_MASK) & (cols >= key_lo) & (cols < key_hi)
        if PAIRWISE:
            vis = (cols[None, :] < hi[:, None]) & key_ok[None, :]
            if HAS_START:  # else lo is 0 or the mask's first visible key, below which key_ok is false
                vis = vis & (cols[None, :] >= lo[:, None])
            meets = tl.max(((lo < start + BLOCK_N) & (hi > start)).to(tl.int32)) > 0
        else:  # a skip here would make ptxas serialise every wgmma of the kernel (C7515)
            vis = key_ok[None, :]
            meets = True
        if meets:
            k_ok = key_ok
            if PAIRWISE:
                k_ok = key_ok & (tl.load(k_bad + cols, mask=key_ok, other=0) == 0)
            kt = _load(_cols_ptrs(k_base, cols, skl, dims), k_ok[None, :], (dims < D)[:, None], D, BLOCK_D)
            vt = _load(_cols_ptrs(v_base, cols, svl, dims), key_ok[None, :], (dims < D)[:, None], D, BLOCK_D)
            s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
            p = tl.where(vis, _probs(s, m[:, None], log_sum[:, None], PAIR), 0.0)
            dp = tl.dot(do, vt, input_precision=PRECISION)
            if DROPOUT:
                dp = tl.where(_keep(Seed, row0, rows, start, threshold, BLOCK_N), dp * keep_scale, 0.0)
            ds = tl.where(vis & (p != 1.0), p * (dp - delta[:, None]), 0.0)
            dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
    return dq


@triton.jit
def bwd_dq_program(
    pid_m, pid_bh,
    Q, K, V, DO, Lse, Delta, BadK, DQ, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sdqb, sdqh, sdql,
    KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed,
    Hq, Lq, Lk, group, scale, scale_log2, threshold, keep_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_START: tl.constexpr,
    HAS_END: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PAIR: tl.constexpr,
    POS_SCALE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = pid_bh // Hq
    h = pid_bh % Hq
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), (h // group).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    lo, hi, active = _row_ranges(b, rows, Lq, Lk, KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl,
                                 MaskLo, MaskHi, HAS_KVLEN, HAS_QLEN, HAS_START, HAS_END, HAS_MASK, CAUSAL)
    first, full_lo, full_hi, last = _tile_runs(lo, hi, active, Lk, BLOCK_N, HAS_MASK)
    dims = tl.arange(0, BLOCK_D)
    in_q = rows < Lq
    q = _load(_rows_ptrs(Q + b64 * sqb + h64 * sqh, rows, sql, dims), in_q[:, None], (dims < D)[None, :], D, BLOCK_D)
    do = _load(_rows_ptrs(DO + b64 * sdb + h64 * sdh, rows, sdl, dims), in_q[:, None], (dims < D)[None, :], D, BLOCK_D)
    row0 = (b64 * Hq + h64) * Lq
    m, log_sum = _stats_base2(Lse, row0 + rows, active, PAIR)
    delta = tl.load(Delta + row0 + rows, mask=active, other=0.0)
    k_base = K + b64 * skb + hk64 * skh
    v_base = V + b64 * svb + hk64 * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    key_lo, key_hi = tl.min(tl.where(active, lo, Lk)), last
    PAIRWISE: tl.constexpr = HAS_START or HAS_END or CAUSAL
    k_bad = BadK + (b64 * (Hq // group) + hk64) * Lk
    dq = _dq_partial(dq, q, do, m, log_sum, delta, k_base, v_base, k_bad, skl, svl, first, tl.minimum(full_lo, last), lo, hi, key_lo,
                     key_hi, dims, rows, Mask, smb, sml, b, Lk, Seed, row0, threshold, keep_scale, scale_log2, D, BLOCK_D,
                     HAS_START, HAS_MASK, PAIRWISE, DROPOUT, PAIR, PRECISION, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)
    dq = _dq_full(dq, q, do, m, log_sum, delta, _cols_ptrs(k_base, offs_n, skl, dims), _cols_ptrs(v_base, offs_n, svl, dims),
                  skl, svl, full_lo, full_hi, dims, rows, Seed, row0, threshold, keep_scale, scale_log2, D, BLOCK_D,
                  DROPOUT, PAIR, PRECISION, BLOCK_N)
    dq = _dq_partial(dq, q, do, m, log_sum, delta, k_base, v_base, k_bad, skl, svl, full_hi, last, lo, hi, key_lo,
                     key_hi, dims, rows, Mask, smb, sml, b, Lk, Seed, row0, threshold, keep_scale, scale_log2, D, BLOCK_D,
                     HAS_START, HAS_MASK, PAIRWISE, DROPOUT, PAIR, PRECISION, BLOCK_N)
    dq = tl.where(active[:, None], dq * scale, 0.0)  # rows that see nothing computed what they hold on full tiles
    tl.store(_rows_ptrs(DQ + b64 * sdqb + h64 * sdqh, rows, sdql, dims), dq.to(DQ.dtype.element_ty),
             mask=in_q[:, None] & (dims[None, :] < D))


# ---- the kernels: one program each; co_attention.py runs the same programs for two directions

# DETERMINISTIC is in the key (and in no kernel body): a process that turns
# torch.use_deterministic_algorithms on gets the table's fixed shape, never a timed pick.
_KEY = ["BLOCK_D", "HAS_KVLEN", "HAS_QLEN", "HAS_START", "HAS_END", "HAS_MASK", "CAUSAL", "DROPOUT", "PAIR", "POS_SCALE",
        "DETERMINISTIC"]


@autotune("fwd", _KEY)
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
    KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed, BadV,
    KeyBias, s_kbb, Hq, Lq, Lk, group, scale_log2, threshold, keep_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_START: tl.constexpr,
    HAS_END: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PAIR: tl.constexpr,
    POS_SCALE: tl.constexpr, PRECISION: tl.constexpr, DETERMINISTIC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    fwd_program(
        *_split_pid(Lq, BLOCK_M),
        Q, K, V, Out, Lse, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
        KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed, BadV,
        KeyBias, s_kbb, Hq, Lq, Lk, group, scale_log2, threshold, keep_scale,
        D, BLOCK_D, HAS_KVLEN, HAS_QLEN, HAS_START, HAS_END, HAS_MASK, CAUSAL, DROPOUT, PAIR, POS_SCALE, PRECISION,
        BLOCK_M, BLOCK_N,
    )


@autotune("dkdv", _KEY)
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, BadQ, BadDO, DK, DV, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl,
    sdkb, sdkh, sdkl, sdvb, sdvh, sdvl,
    KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed,
    Hq, Hkv, Lq, Lk, group, scale, scale_log2, threshold, keep_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_START: tl.constexpr,
    HAS_END: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PAIR: tl.constexpr,
    POS_SCALE: tl.constexpr, PRECISION: tl.constexpr, DETERMINISTIC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    bwd_dkdv_program(
        *_split_pid(Lk, BLOCK_N),
        Q, K, V, DO, Lse, Delta, BadQ, BadDO, DK, DV, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl,
        sdkb, sdkh, sdkl, sdvb, sdvh, sdvl,
        KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed,
        Hq, Hkv, Lq, Lk, group, scale, scale_log2, threshold, keep_scale,
        D, BLOCK_D, HAS_KVLEN, HAS_QLEN, HAS_START, HAS_END, HAS_MASK, CAUSAL, DROPOUT, PAIR, POS_SCALE, PRECISION,
        BLOCK_M, BLOCK_N,
    )


@autotune("dq", _KEY)
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, BadK, DQ, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sdqb, sdqh, sdql,
    KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed,
    Hq, Lq, Lk, group, scale, scale_log2, threshold, keep_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_START: tl.constexpr,
    HAS_END: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PAIR: tl.constexpr,
    POS_SCALE: tl.constexpr, PRECISION: tl.constexpr, DETERMINISTIC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    bwd_dq_program(
        *_split_pid(Lq, BLOCK_M),
        Q, K, V, DO, Lse, Delta, BadK, DQ, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sdqb, sdqh, sdql,
        KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed,
        Hq, Lq, Lk, group, scale, scale_log2, threshold, keep_scale,
        D, BLOCK_D, HAS_KVLEN, HAS_QLEN, HAS_START, HAS_END, HAS_MASK, CAUSAL, DROPOUT, PAIR, POS_SCALE, PRECISION,
        BLOCK_M, BLOCK_N,
    )


@triton.jit
def _mask_bounds_kernel(Mask, smb, sml, KvLen, s_kvl, Lo, Hi, Bias, s_bias, Lk, width,
                        HAS_KVLEN: tl.constexpr, BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """Batch b's first visible key and one past its last (Lk and 0 when none), under the mask
    and kv_lengths; with BIAS also the forward's key bias row (Visibility.key_bias) over `width`
    keys. One pass over the mask, in place of a dozen small torch ops per call."""
    b = tl.program_id(0).to(tl.int64)
    end = Lk
    if HAS_KVLEN:
        end = tl.minimum(tl.maximum(tl.load(KvLen + b * s_kvl), 0), Lk)
    first = Lk
    last = 0
    for j0 in range(0, width, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        visible = (j < end) & _key_visible(j, Mask, smb, sml, b, Lk, True)
        first = tl.minimum(first, tl.min(tl.where(visible, j, Lk)))
        last = tl.maximum(last, tl.max(tl.where(visible, j + 1, 0)))
        if BIAS:
            tl.store(Bias + b * s_bias + j, tl.where(visible, 0.0, float("-inf")))
    tl.store(Lo + b, first)
    tl.store(Hi + b, last)


# ---- host side

class Visibility:
    """The visibility arguments of one direction, as kernel arguments (pointers with their
    strides; a dummy where absent) and constexpr flags."""

    def __init__(self, q, k, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal, dropout_p, seed,
                 mask_bounds=True, key_bias=False):
        dummy = q.new_empty(1, dtype=torch.int32)
        pick = lambda t: t if t is not None else dummy
        stride = lambda t, d: t.stride(d) if t is not None else 0
        # Whether one row may see a key another row of its block does not (the kernels' PAIRWISE).
        self.pairwise = kv_start is not None or kv_end is not None or bool(causal)
        self._key_bias = (dummy, 0)
        mask_lo = mask_hi = dummy
        if key_padding_mask is not None and mask_bounds:  # (the decoding kernel reads the mask per key)
            B, Lk = key_padding_mask.shape
            mask_lo, mask_hi = (torch.empty(B, dtype=torch.int32, device=q.device) for _ in range(2))
            with_bias = key_bias and not self.pairwise
            width = triton.cdiv(max(Lk, 1), KEY_BIAS_ALIGN.value) * KEY_BIAS_ALIGN.value if with_bias else Lk
            if with_bias:
                self._key_bias = (torch.empty(B, width, dtype=torch.float32, device=q.device), width)
            _mask_bounds_kernel[(B,)](key_padding_mask, *key_padding_mask.stride(), pick(kv_lengths), stride(kv_lengths, 0),
                                      mask_lo, mask_hi, self._key_bias[0], width, Lk, width,
                                      HAS_KVLEN=kv_lengths is not None, BIAS=with_bias, BLOCK=KEY_BIAS_ALIGN.value)
        self.lengths = (pick(kv_lengths), stride(kv_lengths, 0), pick(q_lengths), stride(q_lengths, 0),
                        pick(kv_start), stride(kv_start, 0), stride(kv_start, 1), pick(kv_end), stride(kv_end, 0), stride(kv_end, 1))
        self.mask = (pick(key_padding_mask), stride(key_padding_mask, 0), stride(key_padding_mask, 1), mask_lo, mask_hi,
                     seed if seed is not None else dummy)
        self.dropout = (dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p))
        self.flags = dict(HAS_KVLEN=kv_lengths is not None, HAS_QLEN=q_lengths is not None, HAS_START=kv_start is not None,
                          HAS_END=kv_end is not None, HAS_MASK=key_padding_mask is not None, CAUSAL=bool(causal),
                          DROPOUT=dropout_p > 0)
        self._dummy = dummy

    def args(self):
        return (*self.lengths, *self.mask)

    def key_bias(self):
        """The forward's key_padding_mask, where no per-row range applies and key_bias=True, as
        (tensor, row stride): 0.0 where a key is visible, -inf where the mask or kv_lengths hides
        it or it lies past Lk, each row padded to a multiple of KEY_BIAS_ALIGN (so the kernel's
        loads need no bounds); else a dummy."""
        return self._key_bias

    def bad_rows(self, t):
        """The non-finite rows of t (B, H, L, D) as int8 flags (B, H, L), for the pairwise kernels;
        a dummy for the others, which never read them."""
        if not self.pairwise:
            return self._dummy
        B, H, L, D = t.shape
        bad = torch.empty(B, H, L, dtype=torch.int8, device=t.device)
        block = 64 if not INTERPRET else 16
        _nonfinite_rows_kernel[(triton.cdiv(L, block) * B * H,)](
            t, bad, *t.stride()[:3], H, L, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_L=block)
        return bad


def common_flags(q, scale):
    return dict(
        D=q.shape[-1],
        DETERMINISTIC=torch.are_deterministic_algorithms_enabled(),
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
        PAIR=q.dtype == torch.float32,
        POS_SCALE=scale >= 0,
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
    _delta_kernel[(triton.cdiv(Lq, block) * B * Hq,)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], Hq, Lq, D=D, BLOCK_D=block_d, BLOCK_M=block,
    )
    return delta


def cross_attention(q, k, v, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal, dropout_p, seed, scale):
    from mmkernels.backends.triton import decoding  # it builds on this module's kernels
    B, Hq, Lq, D = q.shape
    out = torch.empty_like(q)
    lse = new_stats(q)
    if out.numel() == 0 or k.shape[2] == 0:
        return out.zero_(), _no_key(lse)
    if decoding.applies(q):
        vis = Visibility(q, k, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal, dropout_p, seed,
                         mask_bounds=False)
        return decoding.decode(q, k, v, out, lse, vis, scale)
    vis = Visibility(q, k, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal, dropout_p, seed, key_bias=True)
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]) * B * Hq,)
    _fwd_kernel[grid](q, k, v, out, lse, *leading_strides(q, k, v, out), *vis.args(), vis.bad_rows(v), *vis.key_bias(),
                      Hq, Lq, k.shape[2], Hq // k.shape[1], scale * LOG2E, *vis.dropout,
                      **common_flags(q, scale), **vis.flags)
    return out, lse


def cross_attention_backward(grad_out, q, k, v, out, lse, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal,
                             dropout_p, seed, scale):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    flags = common_flags(q, scale)
    lse = lse.contiguous()
    delta = row_delta(out, grad_out, flags["BLOCK_D"])
    vis = Visibility(q, k, kv_lengths, key_padding_mask, q_lengths, kv_start, kv_end, causal, dropout_p, seed)
    group = Hq // Hkv
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]) * B * Hkv,)](
        q, k, v, grad_out, lse, delta, vis.bad_rows(q), vis.bad_rows(grad_out), dk, dv, *leading_strides(q, k, v, grad_out, dk, dv), *vis.args(),
        Hq, Hkv, Lq, Lk, group, scale, scale * LOG2E, *vis.dropout, **flags, **vis.flags)
    _bwd_dq_kernel[lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]) * B * Hq,)](
        q, k, v, grad_out, lse, delta, vis.bad_rows(k), dq, *leading_strides(q, k, v, grad_out, dq), *vis.args(),
        Hq, Lq, Lk, group, scale, scale * LOG2E, *vis.dropout, **flags, **vis.flags)
    return dq, dk, dv
