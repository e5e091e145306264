"""What every backend shares: the facts a backend judges inputs by, and the accumulation dtype."""
from typing import NamedTuple

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every input dtype but float64, which keeps its precision (for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stats_shape(dtype: torch.dtype, rows: tuple) -> tuple:
    """(shape, dtype) of the softmax statistics cross_attention saves for its backward, for query
    rows of shape `rows` (B, Hq, Lq). Half inputs: the log-sum-exp, float32. float32/float64
    inputs: the row max and the log of the row sum, side by side in float64, never their sum:
    an fp32 lse of ~100 is off by ~1e-5, and even in float64 max + log(sum) loses the sum when
    the max is huge (scale=1e30), while the backward must get the forward's probabilities back
    to the last bit for sharp softmaxes (learned temperatures). The max is in the backend's own
    score units (base 2 on triton), so a backward must run on the forward's backend."""
    if dtype in (torch.float32, torch.float64):
        return (*rows, 2), torch.float64
    return tuple(rows), torch.float32


def gpu_index(device: torch.device) -> int | None:
    """The GPU a cuda Problem is on, or None where there is none to ask: a Problem can name cuda
    on a machine without a driver (the support table, available_backends("cuda")), and asking
    would raise."""
    if not torch.cuda.is_available():
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


class Problem(NamedTuple):
    """The facts about one call that decide which backends can run it (mmkernels/spec.py
    Capability says which facts each backend's kernels of an op take). A tuple, not a
    dataclass: every call of an op builds one, and a frozen dataclass costs microseconds."""

    op: str  # the op's name, a key of mmkernels.spec.SPECS
    device: torch.device
    dtype: torch.dtype
    head_dim: int = 0  # attention ops (cross_attention, co_attention); 0 for the rest
    modalities: int = 0  # the fusion ops: how many modalities (gated_fusion: 2); 0 for attention
    aligned: bool = True  # every row of the attention operands starts on a 16-byte boundary

    @staticmethod
    def of(op: str, *tensors: torch.Tensor, head_dim: int = 0, modalities: int = 0) -> "Problem":
        """Judged on tensors[0]'s device and dtype, and on the row alignment of all of them
        (which only the cuda backend needs, so it is only looked at on CUDA)."""
        t = tensors[0]
        aligned = not t.is_cuda or all(map(rows_aligned, tensors))
        return Problem(op, t.device, t.dtype, head_dim, modalities, aligned)


def rows_aligned(t: torch.Tensor) -> bool:
    """Whether every row (last dim) of t starts on a 16-byte boundary, as kernels that move rows
    in 16-byte pieces need: an aligned start, and strides of the leading dims in whole 16 bytes.
    While torch.compile traces (fake tensors have no address) the storage is taken to be
    aligned, as every torch allocation is; the kernel checks the real address again."""
    start = t.storage_offset() * t.element_size()
    try:
        start += t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a fake tensor
        pass
    if start % 16:
        return False
    per_16_bytes = max(1, 16 // t.element_size())
    return all(stride % per_16_bytes == 0 for stride, size in zip(t.stride()[:-1], t.shape[:-1]) if size > 1)


def co_attention_by_two_calls(attend, q_a, k_a, v_a, q_b, k_b, v_b, lengths_a, lengths_b,
                              kv_start_a, kv_end_a, kv_start_b, kv_end_b, scale):
    """co_attention from a backend's cross_attention: a over b's keys, then b over a's."""
    return (*attend(q_a, k_b, v_b, lengths_b, None, lengths_a, kv_start_a, kv_end_a, False, 0.0, None, scale),
            *attend(q_b, k_a, v_a, lengths_a, None, lengths_b, kv_start_b, kv_end_b, False, 0.0, None, scale))


def co_attention_backward_by_two_calls(attend_backward, grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b,
                                       out_a, lse_a, out_b, lse_b, lengths_a, lengths_b,
                                       kv_start_a, kv_end_a, kv_start_b, kv_end_b, scale):
    dq_a, dk_b, dv_b = attend_backward(grad_a, q_a, k_b, v_b, out_a, lse_a, lengths_b, None, lengths_a,
                                       kv_start_a, kv_end_a, False, 0.0, None, scale)
    dq_b, dk_a, dv_a = attend_backward(grad_b, q_b, k_a, v_a, out_b, lse_b, lengths_a, None, lengths_b,
                                       kv_start_b, kv_end_b, False, 0.0, None, scale)
    return dq_a, dk_a, dv_a, dq_b, dk_b, dv_b
