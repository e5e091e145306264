"""concat_weighted_fusion against its peers."""
import pytest

from common import run
from mmkernels.bench.concat_weighted_fusion import ConcatWeightedFusionCase, providers

PROVIDERS = ["mmkernels-cpu", "mmkernels-triton", "mmkernels-cuda", "eager", "compile"]
CASES = [ConcatWeightedFusionCase(M, rows, D, mode) for (M, rows, D) in [(2, 4096, 256), (3, 8192, 768)] for mode in ("fwd", "fwd+bwd")]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.mode}-{c.shape.replace(' ', '')}")
def test_concat_weighted_fusion(benchmark, case, provider, device, dtype):
    benchmark.group = f"concat_weighted_fusion {case.mode} {case.shape}"
    run(benchmark, case, provider, device, dtype, providers)
