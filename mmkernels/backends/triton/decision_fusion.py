"""Triton decision fusion: one program per block of rows. Per modality an online pass gives the
softmax max and sum over column chunks (once, before the output loop); a second pass writes
sum_m w_m p_m once. The backward
writes each logit gradient once and per-row <g, p_m> for the weight gradient (summed by torch,
deterministically)."""
import torch
import triton
import triton.language as tl

from mmkernels.backends.triton.common import padded, pick
from mmkernels.backends.triton.config import INTERPRET, fusion_config


@triton.jit
def _stats(x_ptr, stride, rows, row_ok, C, PROB: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row max and sum of exp(x - max) over all columns (online), or (0, 1) for logits."""
    mx = tl.full([rows.shape[0]], float("-inf"), tl.float32)
    total = tl.zeros([rows.shape[0]], tl.float32)
    if PROB:
        cols0 = tl.arange(0, BLOCK_C)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < C), other=float("-inf")).to(tl.float32)
            new = tl.maximum(mx, tl.max(x, 1))
            safe = tl.where(new == float("-inf"), 0.0, new)
            total = total * tl.exp(mx - safe) + tl.sum(tl.exp(x - safe[:, None]), 1)
            mx = new
    else:
        mx = tl.zeros([rows.shape[0]], tl.float32)
        total = tl.full([rows.shape[0]], 1.0, tl.float32)
    return mx, total


@triton.jit
def _p(x_ptr, stride, rows, cols, mask, mx, total, PROB: tl.constexpr):
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if PROB:
        return tl.exp(x - mx[:, None]) / total[:, None]
    return x


@triton.jit
def _fwd_kernel(L0, L1, L2, L3, L4, L5, L6, L7, Strides, W, Out, rows_total, C,
                M: tl.constexpr, MP: tl.constexpr, PROB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < rows_total
    cols0 = tl.arange(0, BLOCK_C)
    mods = tl.arange(0, MP)
    # Each modality's softmax statistics once, kept as columns of (BLOCK_R, MP) tiles.
    mx_all = tl.zeros([BLOCK_R, MP], tl.float32)
    total_all = tl.zeros([BLOCK_R, MP], tl.float32)
    for m in tl.static_range(M):
        mx, total = _stats(pick(m, L0, L1, L2, L3, L4, L5, L6, L7), Strides[m], rows, row_ok, C, PROB, BLOCK_C)
        mx_all = tl.where(mods[None, :] == m, mx[:, None], mx_all)
        total_all = tl.where(mods[None, :] == m, total[:, None], total_all)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        mask = row_ok[:, None] & (cols[None, :] < C)
        acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        for m in tl.static_range(M):
            mx = tl.sum(tl.where(mods[None, :] == m, mx_all, 0.0), 1)
            total = tl.sum(tl.where(mods[None, :] == m, total_all, 0.0), 1)
            acc += tl.load(W + m) * _p(pick(m, L0, L1, L2, L3, L4, L5, L6, L7), Strides[m], rows, cols, mask, mx, total, PROB)
        tl.store(Out + rows[:, None].to(tl.int64) * C + cols[None, :], acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(L0, L1, L2, L3, L4, L5, L6, L7, G0, G1, G2, G3, G4, G5, G6, G7, Strides, W, DOut, dout_stride, GP,
                rows_total, C, M: tl.constexpr, PROB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < rows_total
    cols0 = tl.arange(0, BLOCK_C)
    for m in tl.static_range(M):
        x_ptr = pick(m, L0, L1, L2, L3, L4, L5, L6, L7)
        g_ptr = pick(m, G0, G1, G2, G3, G4, G5, G6, G7)
        stride = Strides[m]
        w = tl.load(W + m)
        mx, total = _stats(x_ptr, stride, rows, row_ok, C, PROB, BLOCK_C)
        gp = tl.zeros([BLOCK_R], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            mask = row_ok[:, None] & (cols[None, :] < C)
            g = tl.load(DOut + rows[:, None].to(tl.int64) * dout_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            gp += tl.sum(g * _p(x_ptr, stride, rows, cols, mask, mx, total, PROB), 1)
        tl.store(GP + rows.to(tl.int64) * M + m, gp, mask=row_ok)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            mask = row_ok[:, None] & (cols[None, :] < C)
            g = tl.load(DOut + rows[:, None].to(tl.int64) * dout_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if PROB:
                grad = w * _p(x_ptr, stride, rows, cols, mask, mx, total, PROB) * (g - gp[:, None])
            else:
                grad = w * g
            tl.store(g_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], grad.to(g_ptr.dtype.element_ty), mask=mask)


def decision_fusion(logits, weights, prob):
    rows, C = logits[0].shape
    out = logits[0].new_empty(rows, C)
    if rows:
        block_r, block_c, warps = fusion_config()
        strides = tuple(t.stride(0) for t in logits)  # kernel arguments, not a device tensor (no copy, no sync)
        if len(logits) > 4 and not INTERPRET:
            warps *= 2  # the unrolled per-modality loads of a column tile: more threads, fewer registers each
        _fwd_kernel[(triton.cdiv(rows, block_r),)](*padded(logits), strides, weights.float().contiguous(), out, rows, C,
                                                    M=len(logits), MP=max(2, triton.next_power_of_2(len(logits))), PROB=prob,
                                                    BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return out


def decision_fusion_backward(grad_out, logits, weights, prob):
    rows, C = logits[0].shape
    grads = [t.new_empty(t.shape) for t in logits]
    gp = torch.zeros(rows, len(logits), dtype=torch.float32, device=grad_out.device)
    if rows:
        block_r, block_c, warps = fusion_config()
        strides = tuple(t.stride(0) for t in logits)
        _bwd_kernel[(triton.cdiv(rows, block_r),)](*padded(logits), *padded(grads), strides, weights.float().contiguous(), grad_out,
                                                    grad_out.stride(0), gp, rows, C, M=len(logits), PROB=prob,
                                                    BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return grads, gp.sum(0).to(weights.dtype)
