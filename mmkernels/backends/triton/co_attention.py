"""Triton co_attention: both directions of cross_attention (a over b's keys, b over a's) in one
launch per stage, for the small shapes where a second launch costs as much as the work. Each
program runs the cross_attention program of its direction (cross_attention.py); the wrappers
below only route the arguments of side a or side b to it."""
import torch
import triton
import triton.language as tl

from mmkernels.backends.base import co_attention_backward_by_two_calls, co_attention_by_two_calls
from mmkernels.backends.triton.config import autotune
from mmkernels.backends.triton.cross_attention import (
    LOG2E,
    Visibility,
    _split_pid,
    bwd_dkdv_program,
    bwd_dq_program,
    common_flags,
    cross_attention,
    cross_attention_backward,
    fwd_program,
    leading_strides,
    new_stats,
    row_delta,
)

# A side is the tuple of one direction's runtime arguments to its cross_attention program (no
# key_padding_mask, dropout or causal in co_attention: their places hold the dummies of
# Visibility); programs below BH_A run side a, the rest side b.
# The autotune key names every flag and the precision (the tuples hide the tensors' dtypes from
# triton's own key).
_CO_KEY = ["BLOCK_D", "PAIR", "POS_SCALE", "PRECISION", "DTYPE", "DETERMINISTIC"] + [f"{flag}_{side}" for side in "AB"
                                                             for flag in ("HAS_KVLEN", "HAS_QLEN", "HAS_START", "HAS_END")]


@autotune("fwd", _CO_KEY)
@triton.jit
def _fwd_co_kernel(
    SIDE_A, SIDE_B, BH_A, L_MAX, D: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_KVLEN_A: tl.constexpr, HAS_QLEN_A: tl.constexpr, HAS_START_A: tl.constexpr, HAS_END_A: tl.constexpr,
    HAS_KVLEN_B: tl.constexpr, HAS_QLEN_B: tl.constexpr, HAS_START_B: tl.constexpr, HAS_END_B: tl.constexpr,
    PAIR: tl.constexpr, POS_SCALE: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, pid_bh = _split_pid(L_MAX, BLOCK_M)
    if pid_bh < BH_A:
        fwd_program(pid_m, pid_bh, *SIDE_A, D, BLOCK_D, HAS_KVLEN_A, HAS_QLEN_A, HAS_START_A, HAS_END_A,
                    False, False, False, PAIR, POS_SCALE, PRECISION, BLOCK_M, BLOCK_N)
    else:
        fwd_program(pid_m, pid_bh - BH_A, *SIDE_B, D, BLOCK_D, HAS_KVLEN_B, HAS_QLEN_B, HAS_START_B, HAS_END_B,
                    False, False, False, PAIR, POS_SCALE, PRECISION, BLOCK_M, BLOCK_N)


@autotune("dkdv", _CO_KEY)
@triton.jit
def _bwd_dkdv_co_kernel(
    SIDE_A, SIDE_B, BH_A, L_MAX, D: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_KVLEN_A: tl.constexpr, HAS_QLEN_A: tl.constexpr, HAS_START_A: tl.constexpr, HAS_END_A: tl.constexpr,
    HAS_KVLEN_B: tl.constexpr, HAS_QLEN_B: tl.constexpr, HAS_START_B: tl.constexpr, HAS_END_B: tl.constexpr,
    PAIR: tl.constexpr, POS_SCALE: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n, pid_bh = _split_pid(L_MAX, BLOCK_N)
    if pid_bh < BH_A:
        bwd_dkdv_program(pid_n, pid_bh, *SIDE_A, D, BLOCK_D, HAS_KVLEN_A, HAS_QLEN_A, HAS_START_A, HAS_END_A,
                         False, False, False, PAIR, POS_SCALE, PRECISION, BLOCK_M, BLOCK_N)
    else:
        bwd_dkdv_program(pid_n, pid_bh - BH_A, *SIDE_B, D, BLOCK_D, HAS_KVLEN_B, HAS_QLEN_B, HAS_START_B,
                         HAS_END_B, False, False, False, PAIR, POS_SCALE, PRECISION, BLOCK_M, BLOCK_N)


@autotune("dq", _CO_KEY)
@triton.jit
def _bwd_dq_co_kernel(
    SIDE_A, SIDE_B, BH_A, L_MAX, D: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_KVLEN_A: tl.constexpr, HAS_QLEN_A: tl.constexpr, HAS_START_A: tl.constexpr, HAS_END_A: tl.constexpr,
    HAS_KVLEN_B: tl.constexpr, HAS_QLEN_B: tl.constexpr, HAS_START_B: tl.constexpr, HAS_END_B: tl.constexpr,
    PAIR: tl.constexpr, POS_SCALE: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, pid_bh = _split_pid(L_MAX, BLOCK_M)
    if pid_bh < BH_A:
        bwd_dq_program(pid_m, pid_bh, *SIDE_A, D, BLOCK_D, HAS_KVLEN_A, HAS_QLEN_A, HAS_START_A, HAS_END_A,
                       False, False, False, PAIR, POS_SCALE, PRECISION, BLOCK_M, BLOCK_N)
    else:
        bwd_dq_program(pid_m, pid_bh - BH_A, *SIDE_B, D, BLOCK_D, HAS_KVLEN_B, HAS_QLEN_B, HAS_START_B, HAS_END_B,
                       False, False, False, PAIR, POS_SCALE, PRECISION, BLOCK_M, BLOCK_N)


def _co_sides(q_a, k_a, q_b, k_b, lengths_a, lengths_b, kv_start_a, kv_end_a, kv_start_b, kv_end_b, scale):
    """Direction a: q_a over modality b's keys (kv_lengths = lengths_b, q_lengths = lengths_a,
    ranges kv_start_a/kv_end_a); b mirrors it."""
    side_a = Visibility(q_a, k_b, lengths_b, None, lengths_a, kv_start_a, kv_end_a, False, 0.0, None)
    side_b = Visibility(q_b, k_a, lengths_a, None, lengths_b, kv_start_b, kv_end_b, False, 0.0, None)
    flags = common_flags(q_a, scale)
    flags["DTYPE"] = str(q_a.dtype)  # the sides' tuples hide the tensors' dtypes from triton's own key
    for suffix, side in (("_A", side_a), ("_B", side_b)):
        for name in ("HAS_KVLEN", "HAS_QLEN", "HAS_START", "HAS_END"):
            flags[name + suffix] = side.flags[name]
    return side_a, side_b, flags


def _sizes(q, k):
    """(Hq, Lq, Lk, group) of one direction."""
    return q.shape[1], q.shape[2], k.shape[2], q.shape[1] // k.shape[1]


def co_attention(q_a, k_a, v_a, q_b, k_b, v_b, lengths_a, lengths_b, kv_start_a, kv_end_a, kv_start_b, kv_end_b, scale):
    """Both directions in one launch per stage (forward: one; backward: dK/dV and dQ, one each,
    after two small delta launches)."""
    if min(t.numel() for t in (q_a, k_a, q_b, k_b)) == 0:  # nothing to launch for
        return co_attention_by_two_calls(cross_attention, q_a, k_a, v_a, q_b, k_b, v_b, lengths_a, lengths_b,
                                         kv_start_a, kv_end_a, kv_start_b, kv_end_b, scale)
    B = q_a.shape[0]
    side_a, side_b, flags = _co_sides(q_a, k_a, q_b, k_b, lengths_a, lengths_b, kv_start_a, kv_end_a, kv_start_b, kv_end_b, scale)
    out_a, out_b = torch.empty_like(q_a), torch.empty_like(q_b)
    lse_a, lse_b = new_stats(q_a), new_stats(q_b)
    L_max = max(q_a.shape[2], q_b.shape[2])
    grid = lambda meta: (triton.cdiv(L_max, meta["BLOCK_M"]) * B * (q_a.shape[1] + q_b.shape[1]),)
    def side(q, k, v, out, lse, vis):
        return (q, k, v, out, lse, *leading_strides(q, k, v, out), *vis.args(), vis.bad_rows(v), *vis.key_bias(), *_sizes(q, k),
                scale * LOG2E, *vis.dropout)

    _fwd_co_kernel[grid](side(q_a, k_b, v_b, out_a, lse_a, side_a), side(q_b, k_a, v_a, out_b, lse_b, side_b),
                         B * q_a.shape[1], L_max, **flags)
    return out_a, lse_a, out_b, lse_b


def co_attention_backward(grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b, out_a, lse_a, out_b, lse_b, lengths_a, lengths_b,
                          kv_start_a, kv_end_a, kv_start_b, kv_end_b, scale):
    if min(t.numel() for t in (q_a, k_a, q_b, k_b)) == 0:
        return co_attention_backward_by_two_calls(cross_attention_backward, grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b,
                                                  out_a, lse_a, out_b, lse_b, lengths_a, lengths_b,
                                                  kv_start_a, kv_end_a, kv_start_b, kv_end_b, scale)
    B = q_a.shape[0]
    side_a, side_b, flags = _co_sides(q_a, k_a, q_b, k_b, lengths_a, lengths_b, kv_start_a, kv_end_a, kv_start_b, kv_end_b, scale)
    lse_a, lse_b = lse_a.contiguous(), lse_b.contiguous()
    delta_a, delta_b = row_delta(out_a, grad_a, flags["BLOCK_D"]), row_delta(out_b, grad_b, flags["BLOCK_D"])
    dq_a, dk_a, dv_a = torch.empty_like(q_a), torch.empty_like(k_a), torch.empty_like(v_a)
    dq_b, dk_b, dv_b = torch.empty_like(q_b), torch.empty_like(k_b), torch.empty_like(v_b)
    scales = (scale, scale * LOG2E)

    def dkdv_side(q, k, v, grad, lse, delta, dk, dv, vis):
        return (q, k, v, grad, lse, delta, vis.bad_rows(q), vis.bad_rows(grad), dk, dv, *leading_strides(q, k, v, grad, dk, dv), *vis.args(), q.shape[1], k.shape[1],
                *_sizes(q, k)[1:], *scales, *vis.dropout)

    def dq_side(q, k, v, grad, lse, delta, dq, vis):
        return (q, k, v, grad, lse, delta, vis.bad_rows(k), dq, *leading_strides(q, k, v, grad, dq), *vis.args(), *_sizes(q, k), *scales,
                *vis.dropout)

    # direction a writes dK/dV of modality b's keys, direction b those of modality a
    Lk_max, Lq_max = max(k_b.shape[2], k_a.shape[2]), max(q_a.shape[2], q_b.shape[2])
    _bwd_dkdv_co_kernel[lambda meta: (triton.cdiv(Lk_max, meta["BLOCK_N"]) * B * (k_b.shape[1] + k_a.shape[1]),)](
        dkdv_side(q_a, k_b, v_b, grad_a, lse_a, delta_a, dk_b, dv_b, side_a),
        dkdv_side(q_b, k_a, v_a, grad_b, lse_b, delta_b, dk_a, dv_a, side_b), B * k_b.shape[1], Lk_max, **flags)
    _bwd_dq_co_kernel[lambda meta: (triton.cdiv(Lq_max, meta["BLOCK_M"]) * B * (q_a.shape[1] + q_b.shape[1]),)](
        dq_side(q_a, k_b, v_b, grad_a, lse_a, delta_a, dq_a, side_a), dq_side(q_b, k_a, v_a, grad_b, lse_b, delta_b, dq_b, side_b),
        B * q_a.shape[1], Lq_max, **flags)
    return dq_a, dk_a, dv_a, dq_b, dk_b, dv_b
