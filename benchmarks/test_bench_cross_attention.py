"""cross_attention against its peers: pytest benchmarks/ (add --benchmark-disable for a smoke run)."""
import pytest

from common import run
from mmkernels.bench.cross_attention import AttentionCase, providers

PROVIDERS = ["mmkernels-cpu", "mmkernels-triton", "mmkernels-cuda", "eager", "sdpa", "sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex", "compile"]
CASES = [
    AttentionCase(B, 8, Lq, Lk, 64, padded=padded, mode=mode)
    for (B, Lq, Lk) in [(2, 16, 256), (2, 128, 1024)]
    for padded in (True, False)
    for mode in ("fwd", "fwd+bwd")
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.mode}-{c.shape.replace(' ', '')}-{'padded' if c.padded else 'dense'}")
def test_cross_attention(benchmark, case, provider, device, dtype):
    benchmark.group = f"cross_attention {case.mode} {case.shape} {'padded' if case.padded else 'dense'}"
    run(benchmark, case, provider, device, dtype, providers)
