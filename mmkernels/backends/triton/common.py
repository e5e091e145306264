"""Triton helpers more than one kernel module uses."""
import triton
import triton.language as tl

from mmkernels.limits import ACTIVATIONS, MAX_MODALITIES

# linear_fusion's activation indices (mmkernels/limits.py ACTIVATIONS), as compile-time constants.
RELU, GELU, SILU, TANH, SIGMOID = (tl.constexpr(ACTIVATIONS.index(a)) for a in ("relu", "gelu", "silu", "tanh", "sigmoid"))


@triton.jit
def pick(m: tl.constexpr, P0, P1, P2, P3, P4, P5, P6, P7):
    if m == 0:
        return P0
    elif m == 1:
        return P1
    elif m == 2:
        return P2
    elif m == 3:
        return P3
    elif m == 4:
        return P4
    elif m == 5:
        return P5
    elif m == 6:
        return P6
    else:
        return P7


def padded(tensors):
    """Up to MAX_MODALITIES tensors as exactly that many pointer arguments (the spares repeat
    the first and are never read)."""
    return list(tensors) + [tensors[0]] * (MAX_MODALITIES - len(tensors))


@triton.jit
def activate(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == RELU:
        x = tl.maximum(x, 0.0)
    elif ACTIVATION == GELU:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == SILU:
        x = x * tl.sigmoid(x)
    elif ACTIVATION == TANH:
        x = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    elif ACTIVATION == SIGMOID:
        x = tl.sigmoid(x)
    return x


@triton.jit
def matmul_acc(acc, A, sa, B, sb, rm, rn, rows, N, K, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += A[rm, :K] @ B[rn, :K]^T for one (BLOCK_M, BLOCK_N) tile; A and B row-major with row
    strides sa and sb, 64-bit offsets."""
    rk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        a = tl.load(A + rm[:, None].to(tl.int64) * sa + ks[None, :], mask=(rm[:, None] < rows) & (ks[None, :] < K), other=0.0)
        b = tl.load(B + rn[None, :].to(tl.int64) * sb + ks[:, None], mask=(rn[None, :] < N) & (ks[:, None] < K), other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
    return acc
