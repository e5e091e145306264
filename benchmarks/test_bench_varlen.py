"""Packed sequences, flash-attn's varlen layout: pytest benchmarks/ (add --benchmark-disable for
a smoke run); `mmkernels bench --op varlen_attention` runs the full size."""
import pytest

from common import run
from mmkernels.bench.runner import providers_of
from mmkernels.bench.varlen_attention import VarlenCase


@pytest.mark.parametrize("provider", ["sdpa-loop", "sdpa", "mmkernels"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_packed_sequences(benchmark, mode, provider, device, dtype):
    case = VarlenCase((40, 7, 25, 16), 4, 32, mode=mode)
    benchmark.group = f"varlen_attention {mode} {case.shape}"
    run(benchmark, case, provider, device, dtype, providers_of)
