"""Triton gated multimodal unit: one program computes the three GEMMs of its output tile
(x_a W_a^T, x_b W_b^T, and the gate's [x_a; x_b] W_z^T over the virtual concatenation) and
fuses tanh, sigmoid and the blend into the epilogue, writing h_a, h_b and z for the backward.
The backward is plain GEMMs, which cuBLAS does best: it reuses the native kernel."""
import torch
import triton
import triton.language as tl

from mmkernels.backends import native
from mmkernels.backends.triton.common import TANH, activate
from mmkernels.backends.triton.config import INTERPRET


@triton.jit
def _accumulate(acc_h, acc_z, X, sx, Wh, swh, Wz, swz, z_col0, rm, rn, rows, N, K, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc_h += x W_h^T and acc_z += x W_z[:, z_col0 : z_col0 + K]^T, sharing each x tile."""
    rk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        x = tl.load(X + rm[:, None].to(tl.int64) * sx + ks[None, :], mask=(rm[:, None] < rows) & (ks[None, :] < K), other=0.0)
        col_ok = (rn[None, :] < N) & (ks[:, None] < K)
        wh = tl.load(Wh + rn[None, :].to(tl.int64) * swh + ks[:, None], mask=col_ok, other=0.0)
        wz = tl.load(Wz + rn[None, :].to(tl.int64) * swz + z_col0 + ks[:, None], mask=col_ok, other=0.0)
        acc_h += tl.dot(x, wh, input_precision=PRECISION)
        acc_z += tl.dot(x, wz, input_precision=PRECISION)
    return acc_h, acc_z


@triton.jit
def _kernel(XA, XB, WA, WB, WZ, BA, BB, BZ, Out, HA, HB, Z, rows, N, Ka, Kb, sxa, sxb, swa, swb, swz,
            HAS_BA: tl.constexpr, HAS_BB: tl.constexpr, HAS_BZ: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    zero = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_a, acc_z = _accumulate(zero, zero, XA, sxa, WA, swa, WZ, swz, 0, rm, rn, rows, N, Ka, PRECISION, BLOCK_K)
    acc_b, acc_z = _accumulate(zero, acc_z, XB, sxb, WB, swb, WZ, swz, Ka, rm, rn, rows, N, Kb, PRECISION, BLOCK_K)
    col_ok = rn < N
    if HAS_BA:
        acc_a += tl.load(BA + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BB:
        acc_b += tl.load(BB + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BZ:
        acc_z += tl.load(BZ + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    h_a, h_b, z = activate(acc_a, TANH), activate(acc_b, TANH), tl.sigmoid(acc_z)
    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    mask = (rm[:, None] < rows) & col_ok[None, :]
    tl.store(Out + offs, (z * h_a + (1.0 - z) * h_b).to(Out.dtype.element_ty), mask=mask)
    tl.store(HA + offs, h_a.to(HA.dtype.element_ty), mask=mask)
    tl.store(HB + offs, h_b.to(HB.dtype.element_ty), mask=mask)
    tl.store(Z + offs, z.to(Z.dtype.element_ty), mask=mask)


def gated_fusion(x_a, x_b, weight_a, weight_b, weight_z, bias_a, bias_b, bias_z):
    # The kernel reads weight rows and biases as contiguous: make them so (they are small).
    weight_a, weight_b, weight_z = (w if w.stride(-1) == 1 else w.contiguous() for w in (weight_a, weight_b, weight_z))
    bias_a, bias_b, bias_z = (b.contiguous() if b is not None else None for b in (bias_a, bias_b, bias_z))
    rows, N = x_a.shape[0], weight_a.shape[0]
    out, h_a, h_b, z = (x_a.new_empty(rows, N) for _ in range(4))
    if rows == 0 or N == 0:
        return out, h_a, h_b, z
    bm, bn, bk = (16, 16, 16) if INTERPRET else (64, 64, 32)
    _kernel[(triton.cdiv(rows, bm), triton.cdiv(N, bn))](
        x_a, x_b, weight_a, weight_b, weight_z, *(b if b is not None else x_a for b in (bias_a, bias_b, bias_z)),
        out, h_a, h_b, z, rows, N, x_a.shape[1], x_b.shape[1], x_a.stride(0), x_b.stride(0),
        weight_a.stride(0), weight_b.stride(0), weight_z.stride(0),
        HAS_BA=bias_a is not None, HAS_BB=bias_b is not None, HAS_BZ=bias_z is not None,
        PRECISION="ieee" if x_a.dtype == torch.float32 else "tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=8 if x_a.dtype == torch.float32 else 4,  # fp32 ieee products of two accumulators: spread the registers
    )
    return out, h_a, h_b, z


gated_fusion_backward = native.gated_fusion_backward
