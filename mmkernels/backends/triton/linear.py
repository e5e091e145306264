"""Triton linear fusion: one GEMM over the virtual concatenation of the modalities (the K loop
walks each modality's features and its weight slice in turn; nothing is concatenated), with the
bias and the activation in the epilogue. The backward is plain GEMMs, which cuBLAS does best: it
reuses the native kernel."""
import torch
import triton
import triton.language as tl

from mmkernels.backends import native
from mmkernels.backends.triton.config import INTERPRET
from mmkernels.backends.triton.fusion import _padded, _pick


@triton.jit
def _activate(x, ACTIVATION: tl.constexpr):
    # indices of mmkernels/ops/linear_fusion.py ACTIVATIONS
    if ACTIVATION == 1:
        x = tl.maximum(x, 0.0)
    elif ACTIVATION == 2:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 3:
        x = x * tl.sigmoid(x)
    elif ACTIVATION == 4:
        x = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    elif ACTIVATION == 5:
        x = tl.sigmoid(x)
    return x


@triton.jit
def _matmul_acc(acc, A, sa, B, sb, rm, rn, rows, N, K, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += A[rm, :K] @ B[rn, :K]^T for one (BLOCK_M, BLOCK_N) tile; A and B row-major with row
    strides sa and sb, 64-bit offsets."""
    rk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        a = tl.load(A + rm[:, None].to(tl.int64) * sa + ks[None, :], mask=(rm[:, None] < rows) & (ks[None, :] < K), other=0.0)
        b = tl.load(B + rn[None, :].to(tl.int64) * sb + ks[:, None], mask=(rn[None, :] < N) & (ks[:, None] < K), other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
    return acc


@triton.jit
def _kernel(F0, F1, F2, F3, F4, F5, F6, F7, W0, W1, W2, W3, W4, W5, W6, W7, Meta, Bias, Out, Pre, rows, N,
            M: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm64 = rm.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for m in tl.static_range(M):  # the K loop walks each modality in turn: the virtual concatenation
        f = _pick(m, F0, F1, F2, F3, F4, F5, F6, F7)
        w = _pick(m, W0, W1, W2, W3, W4, W5, W6, W7)
        acc = _matmul_acc(acc, f, tl.load(Meta + 3 * m), w, tl.load(Meta + 3 * m + 2), rm, rn, rows, N,
                          tl.load(Meta + 3 * m + 1), PRECISION, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < rows) & (rn[None, :] < N)
    if ACTIVATION != 0:
        tl.store(Pre + rm64[:, None] * N + rn[None, :], acc.to(Pre.dtype.element_ty), mask=mask)
    tl.store(Out + rm64[:, None] * N + rn[None, :], _activate(acc, ACTIVATION).to(Out.dtype.element_ty), mask=mask)


def linear_fusion(features, weights, bias, activation):
    # Rows of the features and weights take a row stride; the kernel reads each row as contiguous.
    weights = [w if w.stride(-1) == 1 else w.contiguous() for w in weights]
    bias = bias.contiguous() if bias is not None else None
    rows, N = features[0].shape[0], weights[0].shape[0]
    out = features[0].new_empty(rows, N)
    pre = features[0].new_empty(0) if activation == 0 else features[0].new_empty(rows, N)
    if rows == 0 or N == 0:
        return out, pre
    meta = torch.tensor([v for f, w in zip(features, weights) for v in (f.stride(0), f.shape[1], w.stride(0))], dtype=torch.int64, device=out.device)
    bm, bn, bk = (16, 16, 16) if INTERPRET else (64, 64, 32)
    _kernel[(triton.cdiv(rows, bm), triton.cdiv(N, bn))](
        *_padded(features), *_padded(weights), meta, bias if bias is not None else out, out, pre, rows, N,
        M=len(features), HAS_BIAS=bias is not None, ACTIVATION=activation,
        PRECISION="ieee" if out.dtype == torch.float32 else "tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
    )
    return out, pre


linear_fusion_backward = native.linear_fusion_backward
