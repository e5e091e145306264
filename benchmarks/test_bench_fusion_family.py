"""decision_fusion, linear_fusion and co_attention against their peers."""
import pytest

from common import run
from mmkernels.bench.attention import CoAttentionCase, co_providers
from mmkernels.bench.family import DecisionCase, LinearCase, providers

CASES = [DecisionCase(3, 2048, 100, mode) for mode in ("fwd", "fwd+bwd")] + [LinearCase(2, 2048, 128, 256, mode) for mode in ("fwd", "fwd+bwd")]


@pytest.mark.parametrize("provider", ["mmkernels-cpu", "mmkernels-triton", "mmkernels-cuda", "eager", "compile"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.mode}-{c.shape.replace(' ', '')}")
def test_fusion_family(benchmark, case, provider, device, dtype):
    benchmark.group = f"{case.op} {case.mode} {case.shape}"
    run(benchmark, case, provider, device, dtype, providers)


@pytest.mark.parametrize("provider", ["mmkernels-cpu", "mmkernels-triton", "two-calls-cpu", "two-calls-triton", "eager"])
@pytest.mark.parametrize("case", [CoAttentionCase(2, 4, 16, 48, 32, mode) for mode in ("fwd", "fwd+bwd")], ids=lambda c: c.mode)
def test_co_attention(benchmark, case, provider, device, dtype):
    benchmark.group = f"co_attention {case.mode} {case.shape}"
    run(benchmark, case, provider, device, dtype, co_providers)
