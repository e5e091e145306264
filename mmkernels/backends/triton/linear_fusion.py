"""Triton linear fusion: one GEMM over the virtual concatenation of the modalities (the K loop
walks each modality's features and its weight slice in turn; nothing is concatenated), with the
bias and the activation in the epilogue. The backward is plain GEMMs, which cuBLAS does best: it
reuses the native kernel."""
import torch
import triton
import triton.language as tl

from mmkernels.backends import native
from mmkernels.backends.triton.common import activate, matmul_acc, padded, pick
from mmkernels.backends.triton.config import INTERPRET


@triton.jit
def _kernel(F0, F1, F2, F3, F4, F5, F6, F7, W0, W1, W2, W3, W4, W5, W6, W7, Meta, Bias, Out, Pre, rows, N,
            M: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm64 = rm.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for m in tl.static_range(M):  # the K loop walks each modality in turn: the virtual concatenation
        f = pick(m, F0, F1, F2, F3, F4, F5, F6, F7)
        w = pick(m, W0, W1, W2, W3, W4, W5, W6, W7)
        acc = matmul_acc(acc, f, Meta[3 * m], w, Meta[3 * m + 2], rm, rn, rows, N, Meta[3 * m + 1], PRECISION, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < rows) & (rn[None, :] < N)
    if ACTIVATION != 0:
        tl.store(Pre + rm64[:, None] * N + rn[None, :], acc.to(Pre.dtype.element_ty), mask=mask)
    tl.store(Out + rm64[:, None] * N + rn[None, :], activate(acc, ACTIVATION).to(Out.dtype.element_ty), mask=mask)


def linear_fusion(features, weights, bias, activation):
    # Rows of the features and weights take a row stride; the kernel reads each row as contiguous.
    weights = [w if w.stride(-1) == 1 else w.contiguous() for w in weights]
    bias = bias.contiguous() if bias is not None else None
    rows, N = features[0].shape[0], weights[0].shape[0]
    out = features[0].new_empty(rows, N)
    pre = features[0].new_empty(0) if activation == 0 else features[0].new_empty(rows, N)
    if rows == 0 or N == 0:
        return out, pre
    # (feature row stride, width, weight row stride) per modality: kernel arguments, not a device tensor
    meta = tuple(v for f, w in zip(features, weights) for v in (f.stride(0), f.shape[1], w.stride(0)))
    bm, bn, bk = (16, 16, 16) if INTERPRET else (64, 64, 32)
    _kernel[(triton.cdiv(rows, bm), triton.cdiv(N, bn))](
        *padded(features), *padded(weights), meta, bias if bias is not None else out, out, pre, rows, N,
        M=len(features), HAS_BIAS=bias is not None, ACTIVATION=activation,
        PRECISION="ieee" if out.dtype == torch.float32 else "tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
    )
    return out, pre


linear_fusion_backward = native.linear_fusion_backward
