"""Runs one case: builds the inputs, checks every provider against the oracle (the first
provider, the eager composite), then times each and measures its peak memory."""
import dataclasses
import importlib

import torch

from mmkernels.bench.measure import peak_memory_mib, time_ms

TOLERANCE = {torch.float32: 2e-4, torch.float64: 1e-8, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@dataclasses.dataclass
class Result:
    case: object
    provider: str
    time_ms: float | None = None
    throughput: float | None = None  # TFLOP/s for attention, GB/s for fusion
    peak_mib: float | None = None
    lengths: str = "-"
    note: str = ""  # why there is no time: "n/a: ..." or "WRONG: ..."


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


def run_case(case, device, dtype, full=False):
    inputs = case.inputs(device, dtype)
    lengths = inputs[3] if case.op == "cross_attention" else None
    label = case.lengths_label(lengths) if hasattr(case, "lengths_label") else "-"
    provs = providers_of(case, device, dtype, full)
    comparable = not case.memory_only and getattr(case, "comparable", True)  # False: random by design (dropout)
    oracle = torch.nan_to_num(next(iter(provs.values()))(*inputs).float()) if comparable else None
    results = []
    for name, provider in provs.items():
        r = Result(case, name, lengths=label)
        results.append(r)
        try:
            if oracle is not None:
                out = provider(*inputs)
                if out is None:
                    r.note = "n/a: does not take these inputs"
                    continue
                err = (torch.nan_to_num(out.float()) - oracle).abs().max().item() if out.numel() else 0.0
                if not err <= TOLERANCE[dtype] * max(1.0, oracle.abs().max().item()):
                    r.note = f"WRONG: max error {err:.3g}"
                    continue
            fn = timed_call(case, provider, inputs)
            if case.memory_only:
                import time

                start = time.perf_counter()
                r.peak_mib = peak_memory_mib(fn, device)
                r.time_ms = (time.perf_counter() - start) * 1e3
            else:
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
