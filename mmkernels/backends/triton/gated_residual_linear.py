"""Triton GEMM with the gated cross-attention epilogue fused in:
out = x + tanh(gate) * row_mask * (h @ weight^T + bias), the projection written beside it for the
gate's gradient. The backward is plain GEMMs, which cuBLAS does best: it reuses the native kernel."""
import torch
import triton
import triton.language as tl

from mmkernels.backends import native
from mmkernels.backends.triton.common import matmul_acc
from mmkernels.backends.triton.config import INTERPRET


@triton.jit
def _kernel(X, H, W, Bias, TanhGate, RowMask, Out, Proj, rows, N, K, sx, sh, sw, so, sp,
            HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm64 = rm.to(tl.int64)
    acc = matmul_acc(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), H, sh, W, sw, rm, rn, rows, N, K, PRECISION, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < rows) & (rn[None, :] < N)
    tl.store(Proj + rm64[:, None] * sp + rn[None, :], acc.to(Proj.dtype.element_ty), mask=mask)
    scale = tl.load(TanhGate).to(tl.float32) + tl.zeros([BLOCK_M], tl.float32)
    if HAS_MASK:
        scale *= tl.load(RowMask + rm, mask=rm < rows, other=0.0).to(tl.float32)
    x = tl.load(X + rm64[:, None] * sx + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + rm64[:, None] * so + rn[None, :], (x + scale[:, None] * acc).to(Out.dtype.element_ty), mask=mask)


def gated_residual_linear(x, h, weight, bias, gate, row_mask):
    # The kernel reads weight rows, the bias and the row mask as contiguous: make them so.
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    row_mask = row_mask.contiguous() if row_mask is not None else None
    rows, N = x.shape
    out, proj = torch.empty_like(x), x.new_empty(rows, N)
    if rows == 0 or N == 0:
        return out.copy_(x), proj.zero_()
    bm, bn, bk = (16, 16, 16) if INTERPRET else (64, 64, 32)
    tanh_gate = torch.tanh(gate.float())
    _kernel[(triton.cdiv(rows, bm), triton.cdiv(N, bn))](
        x, h, weight, bias if bias is not None else x, tanh_gate, row_mask if row_mask is not None else x, out, proj,
        rows, N, h.shape[1], x.stride(0), h.stride(0), weight.stride(0), out.stride(0), proj.stride(0),
        HAS_BIAS=bias is not None, HAS_MASK=row_mask is not None, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
    )
    return out, proj


gated_residual_linear_backward = native.gated_residual_linear_backward
