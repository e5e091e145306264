"""Runs one case: builds the inputs, checks every provider against the oracle (the first
provider, the eager composite), then times each and measures its peak memory."""
import dataclasses
import importlib

import torch

from mmkernels.bench.measure import peak_memory_mib, time_ms

TOLERANCE = {torch.float32: 2e-4, torch.float64: 1e-8, torch.float16: 2e-2, torch.bfloat16: 6e-2}
MEMORY_ONLY = "memory only"  # the note of a case measured for its peak memory, one call, not timed


@dataclasses.dataclass
class Result:
    case: object
    provider: str
    time_ms: float | None = None
    throughput: float | None = None  # TFLOP/s for attention, GB/s for fusion
    peak_mib: float | None = None
    lengths: str = "-"
    note: str = ""  # why there is no time: "n/a: ...", "WRONG: ..." or MEMORY_ONLY


def timed_call(case, provider, inputs):
    """A zero-argument callable for the case's mode; fwd+bwd differentiates the leaves the
    case names."""
    if case.mode == "fwd":
        return lambda: provider(*inputs)
    leaves, args = case.differentiable(inputs)
    grad = torch.randn_like(provider(*inputs))
    return lambda: torch.autograd.grad(provider(*args), leaves, grad)


def unit(case) -> str:
    """Attention-like cases count FLOPs, the fusion family bytes."""
    return "TFLOP/s" if hasattr(case, "flops") else "GB/s"


def providers_of(case, device, dtype, full):
    """name -> callable(*inputs); the first is the correctness oracle. A case class may bring its
    own peers (`peers`), else its op's (mmkernels/bench/<op>.py `providers`)."""
    peers = getattr(case, "peers", None) or importlib.import_module(f"mmkernels.bench.{case.op}").providers
    return peers(case, device, dtype, full)


def _gradients(case, provider, inputs, grad_seed=0):
    """fwd+bwd cases: the gradients of the case's leaves under one fixed output gradient."""
    leaves, args = case.differentiable(inputs)
    out = provider(*args)
    if out is None:
        return None
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    return [torch.nan_to_num(g.float()) if g is not None else torch.zeros_like(leaf, dtype=torch.float32)
            for g, leaf in zip(grads, leaves)]


def _error(got, expected, dtype) -> str:
    """'' if got is within the case's tolerance of expected (scaled by expected's size), else why not."""
    err = (got - expected).abs().max().item() if got.numel() else 0.0
    return "" if err <= TOLERANCE[dtype] * max(1.0, expected.abs().max().item()) else f"max error {err:.3g}"


def oracle_answers(case, provs, inputs):
    """The first provider's output and, for fwd+bwd cases, its gradients; None where the case is
    not comparable (memory only, or random by design: dropout)."""
    if case.memory_only or not getattr(case, "comparable", True):  # False: random by design (dropout)
        return None
    first = next(iter(provs.values()))
    return torch.nan_to_num(first(*inputs).float()), _gradients(case, first, inputs) if case.mode == "fwd+bwd" else None


def check(case, provider, inputs, dtype, answers) -> str:
    """'' if the provider gives the oracle's answers (forward, and the backward of fwd+bwd cases),
    'n/a: ...' if it does not take these inputs, else 'WRONG: ...'."""
    if case.memory_only:  # one call, measured for memory: not run an extra time here
        return ""
    out = provider(*inputs)
    if out is None:
        return "n/a: does not take these inputs"
    if answers is None:  # random by design (dropout): runs, compared by the tests instead
        return ""
    oracle, oracle_grads = answers
    wrong = _error(torch.nan_to_num(out.float()), oracle, dtype)
    if not wrong and oracle_grads is not None:
        wrong = next((f"gradient of input {i}: {e}" for i, (g, expected) in enumerate(zip(_gradients(case, provider, inputs), oracle_grads))
                      if (e := _error(g, expected, dtype))), "")
    return f"WRONG: {wrong}" if wrong else ""


def run_case(case, device, dtype, full=False):
    inputs = case.inputs(device, dtype)
    lengths = inputs[3] if case.op == "cross_attention" else None
    label = case.lengths_label(lengths) if hasattr(case, "lengths_label") else "-"
    provs = providers_of(case, device, dtype, full)
    answers = oracle_answers(case, provs, inputs)
    results = []
    for name, provider in provs.items():
        r = Result(case, name, lengths=label)
        results.append(r)
        try:
            r.note = check(case, provider, inputs, dtype, answers)
            if r.note:
                continue
            fn = timed_call(case, provider, inputs)
            if case.memory_only:
                r.peak_mib = peak_memory_mib(fn, device)
                r.note = MEMORY_ONLY
                continue
            r.time_ms = time_ms(fn, device)
            r.peak_mib = peak_memory_mib(fn, device)
        except Exception as e:  # a peer that can't run these inputs is reported, not fatal
            r.note = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            continue
        if unit(case) == "TFLOP/s":
            r.throughput = case.flops(lengths) / (r.time_ms * 1e-3) / 1e12
        else:
            r.throughput = case.bytes_moved(dtype) / (r.time_ms * 1e-3) / 1e9
    return results
