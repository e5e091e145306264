"""Small calls, where per-call overhead is the cost: pytest benchmarks/ (add --benchmark-disable
for a smoke run); `mmkernels bench --small` runs them all (mmkernels.bench.suites.small_call_cases)."""
import pytest

from common import run
from mmkernels.bench.models import GenerateCase, MhaLayerCase
from mmkernels.bench.runner import providers_of


@pytest.mark.parametrize("provider", ["stock", "mmkernels"])
def test_layer_at_one_query_row(benchmark, provider, device, dtype):
    case = MhaLayerCase(512, 8, 1, 64)
    benchmark.group = f"mha_layer {case.shape}"
    run(benchmark, case, provider, device, dtype, providers_of)


@pytest.mark.parametrize("provider", ["transformers-sdpa", "mmkernels"])
def test_greedy_generation(benchmark, provider, device, dtype):
    pytest.importorskip("transformers")
    case = GenerateCase("tiny", tokens=4)
    benchmark.group = f"generate {case.shape}"
    run(benchmark, case, provider, device, dtype, providers_of)
