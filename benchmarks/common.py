"""One benchmark = one case x one provider: correctness (the forward, and for fwd+bwd cases the
gradients) is checked once against the first provider (the eager composite, or the stock model)
before anything is timed (a fast wrong answer fails), then pytest-benchmark times it.
Under --benchmark-disable (CI) each case runs once, as a smoke test."""
import pytest
import torch

from mmkernels.bench.runner import check, oracle_answers, timed_call


def run(benchmark, case, provider_name, device, dtype, providers):
    if provider_name == "compile" and device.type == "cpu" and benchmark.disabled:
        pytest.skip("smoke run: torch.compile's first CPU call costs seconds per case; `mmkernels bench` times it")
    provs = providers(case, device, dtype, full=False)
    if provider_name not in provs:
        pytest.skip(f"{provider_name} does not run on {device.type} here")
    inputs = case.inputs(device, dtype)
    verdict = check(case, provs[provider_name], inputs, dtype, oracle_answers(case, provs, inputs))
    if verdict.startswith("n/a"):
        pytest.skip(f"{provider_name} does not take these inputs")
    assert not verdict, f"{provider_name}: {verdict}"
    fn = timed_call(case, provs[provider_name], inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)
    else:
        benchmark(fn)
