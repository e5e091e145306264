"""One benchmark = one case x one provider: correctness is checked once against the first
provider (the eager composite, or the stock model) before anything is timed (a fast wrong answer fails), then pytest-benchmark times it.
Under --benchmark-disable (CI) each case runs once, as a smoke test."""
import pytest
import torch

from mmkernels.bench.runner import TOLERANCE, timed_call


def run(benchmark, case, provider_name, device, dtype, providers):
    if provider_name == "compile" and device.type == "cpu" and benchmark.disabled:
        pytest.skip("smoke run: torch.compile's first CPU call costs seconds per case; `mmkernels bench` times it")
    provs = providers(case, device, dtype, full=False)
    if provider_name not in provs:
        pytest.skip(f"{provider_name} does not run on {device.type} here")
    inputs = case.inputs(device, dtype)
    got = provs[provider_name](*inputs)
    if got is None:
        pytest.skip(f"{provider_name} does not take these inputs")
    if getattr(case, "comparable", True):  # False: random by design (dropout); tests compare it without
        expected = torch.nan_to_num(next(iter(provs.values()))(*inputs).float())  # the oracle: the first provider
        err = (torch.nan_to_num(got.float()) - expected).abs().max().item() if got.numel() else 0.0
        assert err <= TOLERANCE[dtype] * max(1.0, expected.abs().max().item()), f"{provider_name}: max error {err:.3g}"
    fn = timed_call(case, provs[provider_name], inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)
    else:
        benchmark(fn)
