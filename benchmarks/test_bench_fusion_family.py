"""decision_fusion, linear_fusion, gated_fusion, gated_residual_linear and co_attention against their peers."""
import pytest

from common import run
from mmkernels.bench.co_attention import CoAttentionCase
from mmkernels.bench.decision_fusion import DecisionCase
from mmkernels.bench.gated_fusion import GatedFusionCase
from mmkernels.bench.gated_residual_linear import GatedResidualCase
from mmkernels.bench.linear_fusion import LinearCase
from mmkernels.bench.runner import providers_of

MODES = ("fwd", "fwd+bwd")
CASES = ([DecisionCase(3, 2048, 100, mode) for mode in MODES] + [LinearCase(2, 2048, 128, 256, mode) for mode in MODES]
         + [GatedFusionCase(2048, 128, 96, 128, mode) for mode in MODES] + [GatedResidualCase(2048, 256, 128, mode) for mode in MODES])


@pytest.mark.parametrize("provider", ["mmkernels-cpu", "mmkernels-triton", "mmkernels-cuda", "eager", "compile"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.mode}-{c.shape.replace(' ', '')}")
def test_fusion_family(benchmark, case, provider, device, dtype):
    benchmark.group = f"{case.op} {case.mode} {case.shape}"
    run(benchmark, case, provider, device, dtype, providers_of)


@pytest.mark.parametrize("provider", ["mmkernels-cpu", "mmkernels-triton", "two-calls-cpu", "two-calls-triton", "eager"])
@pytest.mark.parametrize("case", [CoAttentionCase(2, 4, 16, 48, 32, mode) for mode in ("fwd", "fwd+bwd")], ids=lambda c: c.mode)
def test_co_attention(benchmark, case, provider, device, dtype):
    benchmark.group = f"co_attention {case.mode} {case.shape}"
    run(benchmark, case, provider, device, dtype, providers_of)
