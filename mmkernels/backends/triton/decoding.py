"""Triton cross_attention for a few query rows over many keys: a decoding step (Lq <= DECODE_MAX_LQ).

The general forward gives every (query block, query head) a program of at least 16 rows: a step
of one token wastes all rows but one, reads each K/V head once per query head of its GQA group,
and launches B x Hq programs where a GPU has room for hundreds. Here a program runs one query
index of one (batch, kv head) over one span of the keys:
- its rows are query heads of the group (up to ROWS; a wider group takes several programs), so
  K/V are read once per group of heads, not once per head (no copy of the cache, as SDPA's
  enable_gqa);
- every row of its tile asks for the same query index, so every visibility rule (kv_lengths,
  key_padding_mask, q_lengths, per-row ranges, causal) is one predicate per key: hidden keys'
  K and V rows load as 0 and their scores are selected to -inf, so nothing of them reaches the
  output, while visible NaN and Inf propagate as the reference's do (no sanitising);
- when B x Hkv x Lq programs would leave the GPU idle, the keys are split among programs
  (flash-decoding): each writes its partial softmax state (max, sum, unnormalised output) and
  a second kernel merges the splits.
The statistics saved for the backward are the general forward's, so the general backward runs
unchanged; the scores are computed as the general kernels compute them (one dot, one multiply by
scale * log2 e), which a sharp softmax's backward needs bit for bit."""
import functools

import torch
import triton
import triton.language as tl

from mmkernels.backends.triton.config import INTERPRET
from mmkernels.backends.triton.cross_attention import (
    LOG2E, _cols_ptrs, _finish, _key_visible, _load, _row_ranges, _rows_ptrs, _softmax_step, common_flags, leading_strides)

DECODE_MAX_LQ = 4
ROWS = 16  # query heads of a group a program takes (tl.dot's smallest tile); wider groups take several
_DEFAULT_SMS = 132  # an H100's, where there is no GPU to ask (the interpreter, tools/compile_gpu.py)


@triton.jit
def _decode_kernel(
    Q, K, V, Out, Lse, PartO, PartM, PartL, PartSeen,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
    KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl, End, s_enb, s_enl, Mask, smb, sml, MaskLo, MaskHi, Seed,
    Hq, Hkv, Lq, Lk, group, chunks, splits, split_len, scale_log2, threshold, keep_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_START: tl.constexpr,
    HAS_END: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PAIR: tl.constexpr,
    PRECISION: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (split, chunk of the group, query index i, batch b, kv head hk), splits fastest:
    the programs of one kv head run side by side and share its K/V in L2. Row r is query head
    hk * group + chunk * BLOCK_M + r, while that is inside the group."""
    pid = tl.program_id(0)
    split = pid % splits
    chunk = pid // splits % chunks
    rest = pid // splits // chunks
    i = rest % Lq
    b = rest // Lq // Hkv
    hk = rest // Lq % Hkv
    b64, hk64, i64 = b.to(tl.int64), hk.to(tl.int64), i.to(tl.int64)
    r = tl.arange(0, BLOCK_M)
    row_ok = chunk * BLOCK_M + r < group
    # One query index for every row: its key range is the same for all of them.
    lo, hi, _ = _row_ranges(b, i + tl.zeros([BLOCK_M], tl.int32), Lq, Lk, KvLen, s_kvl, QLen, s_ql, Start, s_stb, s_stl,
                            End, s_enb, s_enl, MaskLo, MaskHi, HAS_KVLEN, HAS_QLEN, HAS_START, HAS_END, False, CAUSAL)
    key_lo, key_hi = tl.max(lo), tl.max(hi)
    t0 = tl.maximum(split * split_len, key_lo // BLOCK_N * BLOCK_N)  # aligned: dropout draws four keys at a time
    t1 = tl.minimum(split * split_len + split_len, key_hi)
    dims = tl.arange(0, BLOCK_D)
    head0 = hk64 * group + chunk * BLOCK_M
    q = _load(_rows_ptrs(Q + b64 * sqb + head0 * sqh + i64 * sql, r, sqh, dims), row_ok[:, None], (dims < D)[None, :], D,
              BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    kt_ptrs = _cols_ptrs(K + b64 * skb + hk64 * skh, offs_n, skl, dims)
    v_ptrs = _rows_ptrs(V + b64 * svb + hk64 * svh, offs_n, svl, dims)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    seen = 0
    row0 = (b64 * Hq + head0) * Lq + i64  # dropout's row index of row r is row0 + r * Lq
    for start in range(t0, t1, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        cols = start + offs_n
        key_ok = (cols >= key_lo) & (cols < key_hi) & _key_visible(cols, Mask, smb, sml, b, Lk, HAS_MASK)
        seen += tl.sum(key_ok.to(tl.int32))
        kt = _load(kt_ptrs + start.to(tl.int64) * skl, key_ok[None, :], (dims < D)[:, None], D, BLOCK_D)
        s = tl.where(key_ok[None, :], tl.dot(q, kt, input_precision=PRECISION) * scale_log2, float("-inf"))
        p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i, Seed, row0, r * Lq, start, threshold, keep_scale, DROPOUT, BLOCK_N)
        v = _load(v_ptrs + start.to(tl.int64) * svl, key_ok[:, None], (dims < D)[None, :], D, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    stat_rows = (b64 * Hq + head0 + r) * Lq + i64  # rows of the flattened (B, Hq, Lq)
    if SPLIT:
        part = stat_rows * splits + split
        tl.store(PartM + part, m_i, mask=row_ok)
        tl.store(PartL + part, l_i, mask=row_ok)
        tl.store(PartSeen + part, tl.zeros([BLOCK_M], tl.int32) + seen, mask=row_ok)
        tl.store(PartO + part[:, None] * BLOCK_D + dims[None, :], acc, mask=row_ok[:, None])
    else:
        _finish(acc, m_i, l_i, (tl.zeros([BLOCK_M], tl.int32) + seen) == 0,
                Out, _rows_ptrs(b64 * sob + head0 * soh + i64 * sol, r, soh, dims), row_ok[:, None] & (dims[None, :] < D),
                Lse, stat_rows, row_ok, PAIR)


@triton.jit
def _decode_merge_kernel(PartO, PartM, PartL, PartSeen, Out, Lse, sob, soh, sol, Hq, Lq, n_rows, splits,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, PAIR: tl.constexpr, BLOCK_R: tl.constexpr):
    """BLOCK_R rows of the flattened (B, Hq, Lq): their splits' partial states merged as the
    online softmax would have, rescaled to the largest max. A split that saw no key holds max
    -inf, sum 0 and an output of zeros, and so adds nothing; NaN in any split reaches the row."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for split in range(0, splits):
        m = tl.maximum(m, tl.load(PartM + rows * splits + split, mask=row_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    dims = tl.arange(0, BLOCK_D)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    seen = tl.zeros([BLOCK_R], tl.int32)
    for split in range(0, splits):
        part = rows * splits + split
        w = tl.math.exp2(tl.load(PartM + part, mask=row_ok, other=float("-inf")) - m_safe)
        l_i += w * tl.load(PartL + part, mask=row_ok, other=0.0)
        acc += w[:, None] * tl.load(PartO + part[:, None] * BLOCK_D + dims[None, :], mask=row_ok[:, None], other=0.0)
        seen += tl.load(PartSeen + part, mask=row_ok, other=0)
    i = rows % Lq
    h = rows // Lq % Hq
    b = rows // Lq // Hq
    offsets = b[:, None] * sob + h[:, None] * soh + i[:, None] * sol + dims[None, :]
    _finish(acc, m, l_i, seen == 0, Out, offsets, row_ok[:, None] & (dims[None, :] < D), Lse, rows, row_ok, PAIR)


def applies(q) -> bool:
    """Whether a forward call runs here: a few query rows."""
    return q.shape[2] <= DECODE_MAX_LQ


def tiles(dtype, block_d) -> tuple[int, int, int]:
    """(BLOCK_N, warps, stages). A step is bound by reading K and V: the widest key tiles whose
    pipelined K and V buffers stay within the smallest opt-in shared memory of the targets
    (sm_86's 101,376 B), with zero spills on sm_80 and sm_90 (tools/compile_gpu.py checks both;
    wide fp32 rows spill 160-6,600 B at 4 warps on sm_90)."""
    if INTERPRET:
        return 16, 4, 1
    row_bytes = block_d * dtype.itemsize
    return (64, 4, 3) if row_bytes <= 256 else (32, 8, 2)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_keys(device, programs, Lk, block_n) -> tuple[int, int]:
    """(splits, keys per split, a multiple of block_n): enough programs for two per SM, each
    over at least two key tiles."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else _DEFAULT_SMS
    n_tiles = triton.cdiv(Lk, block_n)
    splits = max(1, min(triton.cdiv(2 * sms, programs), n_tiles // 2))
    split_len = triton.cdiv(n_tiles, splits) * block_n
    return triton.cdiv(Lk, split_len), split_len


def decode(q, k, v, out, lse, vis, scale):
    """Fill out and lse (new_stats(q)) for the call whose visibility is vis (built without mask
    bounds: this path reads the mask per key)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    flags = common_flags(q, scale)
    block_d = flags["BLOCK_D"]
    block_n, warps, stages = tiles(q.dtype, block_d)
    chunks = triton.cdiv(group, ROWS)
    programs = B * Hkv * chunks * Lq
    splits, split_len = split_keys(q.device, programs, Lk, block_n)
    n_rows = B * Hq * Lq
    if splits > 1:
        part_o = torch.empty(n_rows * splits, block_d, dtype=torch.float32, device=q.device)
        part_m, part_l = (torch.empty(n_rows * splits, dtype=torch.float32, device=q.device) for _ in range(2))
        part_seen = torch.empty(n_rows * splits, dtype=torch.int32, device=q.device)
    else:
        part_o = part_m = part_l = part_seen = lse  # never read
    _decode_kernel[(splits * programs,)](
        q, k, v, out, lse, part_o, part_m, part_l, part_seen, *leading_strides(q, k, v, out), *vis.args(),
        Hq, Hkv, Lq, Lk, group, chunks, splits, split_len, scale * LOG2E, *vis.dropout,
        D=D, BLOCK_D=block_d, PAIR=flags["PAIR"], PRECISION=flags["PRECISION"], SPLIT=splits > 1,
        BLOCK_M=ROWS, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **vis.flags)
    if splits > 1:
        block_r = 16 if INTERPRET else min(64, 4096 // block_d)  # 32 accumulator registers a thread
        _decode_merge_kernel[(triton.cdiv(n_rows, block_r),)](
            part_o, part_m, part_l, part_seen, out, lse, *out.stride()[:3], Hq, Lq, n_rows, splits,
            D=D, BLOCK_D=block_d, PAIR=flags["PAIR"], BLOCK_R=block_r, num_warps=4)
    return out, lse
