"""Triton concat-weighted fusion: one program per block of rows.

Forward: each modality's row block is read once to accumulate all M gate logits (the
concatenation is never built), the softmax over modalities runs in registers, and the weighted
sum (or weighted concat) of the values is written once. Backward: per row block, the logit
gradients (rows x M, fp32) and every feature/value gradient; the weight gradient is then
dlogits^T @ features_m over fixed row chunks (deterministic: no atomics).

Triton can't index a list of pointers, so up to MAX_MODALITIES modalities travel as separate
pointer arguments and `pick` (common.py) selects one with a compile-time index inside tl.static_range;
their strides and widths travel as a tuple of integers.
"""
import torch
import triton
import triton.language as tl

from mmkernels.backends.triton.common import padded, pick
from mmkernels.backends.triton.config import fusion_config
from mmkernels.limits import WEIGHT_GRAD_CHUNK


@triton.jit
def _gate_logits(F0, F1, F2, F3, F4, F5, F6, F7, FMeta, W, w_ld, Bias, rows, row_ok, mods,
                 M: tl.constexpr, MP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_R, MP) softmax over modalities of concat(features) @ W^T + bias; 0 past M."""
    cols0 = tl.arange(0, BLOCK_C)
    logits = tl.zeros([rows.shape[0], MP], tl.float32)
    for m in tl.static_range(M):
        f = pick(m, F0, F1, F2, F3, F4, F5, F6, F7)
        stride, width, offset = FMeta[3 * m], FMeta[3 * m + 1], FMeta[3 * m + 2]
        for c0 in range(0, width, BLOCK_C):
            cols = c0 + cols0
            x = tl.load(f + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < width), other=0.0).to(tl.float32)
            w = tl.load(W + mods[:, None] * w_ld + offset + cols[None, :], mask=(mods[:, None] < M) & (cols[None, :] < width), other=0.0).to(tl.float32)
            logits += tl.sum(x[:, None, :] * w[None, :, :], 2)
    if HAS_BIAS:
        logits += tl.load(Bias + mods, mask=mods < M, other=0.0).to(tl.float32)[None, :]
    logits = tl.where(mods[None, :] < M, logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, 1)[:, None])
    return e / tl.sum(e, 1)[:, None]


@triton.jit
def _column(g, mods, m: tl.constexpr):
    return tl.sum(tl.where(mods[None, :] == m, g, 0.0), 1)


@triton.jit
def _fwd_kernel(
    F0, F1, F2, F3, F4, F5, F6, F7, V0, V1, V2, V3, V4, V5, V6, V7, FMeta, VMeta,
    W, w_ld, Bias, Out, out_stride, Gate, rows_total,
    M: tl.constexpr, MP: tl.constexpr, HAS_BIAS: tl.constexpr, CONCAT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < rows_total
    mods = tl.arange(0, MP)
    cols0 = tl.arange(0, BLOCK_C)
    g = _gate_logits(F0, F1, F2, F3, F4, F5, F6, F7, FMeta, W, w_ld, Bias, rows, row_ok, mods, M, MP, HAS_BIAS, BLOCK_C)
    tl.store(Gate + rows[:, None].to(tl.int64) * M + mods[None, :], g, mask=row_ok[:, None] & (mods[None, :] < M))
    out_rows = Out + rows[:, None].to(tl.int64) * out_stride
    if CONCAT:
        for m in tl.static_range(M):
            v = pick(m, V0, V1, V2, V3, V4, V5, V6, V7)
            stride, width, offset = VMeta[3 * m], VMeta[3 * m + 1], VMeta[3 * m + 2]
            gm = _column(g, mods, m)
            for c0 in range(0, width, BLOCK_C):
                cols = c0 + cols0
                mask = row_ok[:, None] & (cols[None, :] < width)
                x = tl.load(v + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                tl.store(out_rows + offset + cols[None, :], (gm[:, None] * x).to(Out.dtype.element_ty), mask=mask)
    else:
        width = VMeta[1]
        for c0 in range(0, width, BLOCK_C):
            cols = c0 + cols0
            mask = row_ok[:, None] & (cols[None, :] < width)
            acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
            for m in tl.static_range(M):
                v = pick(m, V0, V1, V2, V3, V4, V5, V6, V7)
                x = tl.load(v + rows[:, None].to(tl.int64) * VMeta[3 * m] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                acc += _column(g, mods, m)[:, None] * x
            tl.store(out_rows + cols[None, :], acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(
    F0, F1, F2, F3, F4, F5, F6, F7, V0, V1, V2, V3, V4, V5, V6, V7, FMeta, VMeta,
    DF0, DF1, DF2, DF3, DF4, DF5, DF6, DF7, DV0, DV1, DV2, DV3, DV4, DV5, DV6, DV7,
    W, w_ld, DOut, dout_stride, Gate, DLogits, rows_total,
    M: tl.constexpr, MP: tl.constexpr, CONCAT: tl.constexpr, SEPARATE_VALUES: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < rows_total
    rows64 = rows[:, None].to(tl.int64)
    mods = tl.arange(0, MP)
    cols0 = tl.arange(0, BLOCK_C)
    g = tl.load(Gate + rows64 * M + mods[None, :], mask=row_ok[:, None] & (mods[None, :] < M), other=0.0)
    # dg_m = <dout_m, v_m>, then the softmax: dlogits = g * (dg - sum_m g_m dg_m)
    dg = tl.zeros([BLOCK_R, MP], tl.float32)
    for m in tl.static_range(M):
        v = pick(m, V0, V1, V2, V3, V4, V5, V6, V7)
        stride, width, offset = VMeta[3 * m], VMeta[3 * m + 1], VMeta[3 * m + 2]
        d_off = offset if CONCAT else 0
        part = tl.zeros([BLOCK_R], tl.float32)
        for c0 in range(0, width, BLOCK_C):
            cols = c0 + cols0
            mask = row_ok[:, None] & (cols[None, :] < width)
            x = tl.load(v + rows64 * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            d = tl.load(DOut + rows64 * dout_stride + d_off + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            part += tl.sum(x * d, 1)
        dg += tl.where(mods[None, :] == m, part[:, None], 0.0)
    dl = g * (dg - tl.sum(g * dg, 1)[:, None])
    tl.store(DLogits + rows64 * M + mods[None, :], dl, mask=row_ok[:, None] & (mods[None, :] < M))
    for m in tl.static_range(M):
        f_width, f_offset = FMeta[3 * m + 1], FMeta[3 * m + 2]
        v_width, v_offset = VMeta[3 * m + 1], VMeta[3 * m + 2]
        d_off = v_offset if CONCAT else 0
        gm = _column(g, mods, m)
        df = pick(m, DF0, DF1, DF2, DF3, DF4, DF5, DF6, DF7)
        for c0 in range(0, f_width, BLOCK_C):
            cols = c0 + cols0
            mask = row_ok[:, None] & (cols[None, :] < f_width)
            w = tl.load(W + mods[:, None] * w_ld + f_offset + cols[None, :], mask=(mods[:, None] < M) & (cols[None, :] < f_width), other=0.0).to(tl.float32)
            grad = tl.sum(dl[:, :, None] * w[None, :, :], 1)
            if not SEPARATE_VALUES:
                grad += gm[:, None] * tl.load(DOut + rows64 * dout_stride + d_off + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(df + rows64 * f_width + cols[None, :], grad.to(df.dtype.element_ty), mask=mask)
        if SEPARATE_VALUES:
            dv = pick(m, DV0, DV1, DV2, DV3, DV4, DV5, DV6, DV7)
            for c0 in range(0, v_width, BLOCK_C):
                cols = c0 + cols0
                mask = row_ok[:, None] & (cols[None, :] < v_width)
                d = tl.load(DOut + rows64 * dout_stride + d_off + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                tl.store(dv + rows64 * v_width + cols[None, :], (gm[:, None] * d).to(dv.dtype.element_ty), mask=mask)


def _meta(tensors):
    """(row stride, width, column offset) per modality, flat: a tuple of kernel arguments, never a
    device tensor built per call (that would be a host-to-device copy and a sync)."""
    meta, offset = [], 0
    for t in tensors:
        meta += [t.stride(0), t.shape[1], offset]
        offset += t.shape[1]
    return tuple(meta)


def concat_weighted_fusion(features, weight, bias, values, concat):
    # The kernels take a row stride for rows, and read the small weight and bias as contiguous.
    weight, bias = weight.contiguous(), bias.contiguous() if bias is not None else None
    vals = values or features
    rows, M = features[0].shape[0], len(features)
    width = sum(v.shape[1] for v in vals) if concat else vals[0].shape[1]
    out = features[0].new_empty(rows, width)
    gate = features[0].new_empty(rows, M, dtype=torch.float32)
    if rows == 0:
        return out, gate
    block_r, block_c, warps = fusion_config()
    _fwd_kernel[(triton.cdiv(rows, block_r),)](
        *padded(features), *padded(vals), _meta(features), _meta(vals),
        weight, weight.stride(0), bias if bias is not None else weight, out, out.stride(0), gate, rows,
        M=M, MP=max(2, triton.next_power_of_2(M)), HAS_BIAS=bias is not None, CONCAT=concat,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return out, gate


def concat_weighted_fusion_backward(grad_out, features, weight, values, gate, concat):
    weight, gate = weight.contiguous(), gate.contiguous()
    vals = values or features
    rows, M = features[0].shape[0], len(features)
    grad_features = [f.new_empty(f.shape) for f in features]
    grad_values = [v.new_empty(v.shape) for v in values]
    dlogits = gate.new_empty(rows, M, dtype=torch.float32)
    if rows > 0:
        block_r, block_c, warps = fusion_config()
        _bwd_kernel[(triton.cdiv(rows, block_r),)](
            *padded(features), *padded(vals), _meta(features), _meta(vals),
            *padded(grad_features), *padded(grad_values or grad_features),
            weight, weight.stride(0), grad_out, grad_out.stride(0), gate, dlogits, rows,
            M=M, MP=max(2, triton.next_power_of_2(M)), CONCAT=concat, SEPARATE_VALUES=bool(values),
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
        )
    grad_weight = torch.zeros(M, weight.shape[1], dtype=torch.float32, device=weight.device)
    offset = 0
    for f in features:  # fixed chunks: a deterministic reduction, never a full fp32 copy
        for r0 in range(0, rows, WEIGHT_GRAD_CHUNK):
            grad_weight[:, offset : offset + f.shape[1]] += dlogits[r0 : r0 + WEIGHT_GRAD_CHUNK].T @ f[r0 : r0 + WEIGHT_GRAD_CHUNK].float()
        offset += f.shape[1]
    return grad_features, grad_weight.to(weight.dtype), dlogits.sum(0).to(weight.dtype), grad_values
