"""The masks real models pass, and a real model's layer: pytest benchmarks/ (add
--benchmark-disable for a smoke run). Shapes are small here; `mmkernels bench` runs the full
sizes (mmkernels.bench.suites.mask_cases)."""
import pytest

from common import run
from mmkernels.bench.cross_attention import MaskedAttentionCase
from mmkernels.bench.models import DecoderTrainCase, MllamaLayerCase
from mmkernels.bench.runner import providers_of

MASK_PROVIDERS = ["mmkernels-cpu", "mmkernels-triton", "mmkernels-cuda", "mmkernels-cpu-lengths", "mmkernels-cpu-mask",
                  "mmkernels-cuda-lengths", "mmkernels-cuda-mask", "mmkernels-triton-lengths", "mmkernels-triton-mask",
                  "eager", "sdpa", "flex"]
MASK_CASES = [MaskedAttentionCase(2, 8, 2, 64, 256, 64, mask, mode=mode)
              for mask in ("images", "padding") for mode in ("fwd", "fwd+bwd")]
# Decoding steps (one query row over a full cache, grouped-query heads too): mmkernels.bench.suites.small_call_cases
DECODE_CASES = [MaskedAttentionCase(2, 8, hkv, 1, 300, 64, "none", mode="fwd") for hkv in (8, 2)]


@pytest.mark.parametrize("provider", MASK_PROVIDERS)
@pytest.mark.parametrize("case", MASK_CASES, ids=lambda c: f"{c.mode}-{c.mask}")
def test_masked_attention(benchmark, case, provider, device, dtype):
    if provider == "flex" and device.type == "cpu" and case.mode == "fwd+bwd":
        pytest.skip("FlexAttention has no backward on the CPU")
    benchmark.group = f"cross_attention {case.mode} {case.shape}"
    run(benchmark, case, provider, device, dtype, providers_of)


@pytest.mark.parametrize("provider", ["mmkernels-cpu", "mmkernels-triton", "mmkernels-cuda", "eager", "sdpa"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"decode-H{c.Hq}/{c.Hkv}")
def test_decode_attention(benchmark, case, provider, device, dtype):
    benchmark.group = f"cross_attention decode {case.shape}"
    run(benchmark, case, provider, device, dtype, providers_of)


@pytest.mark.parametrize("provider", ["transformers-sdpa", "mmkernels"])
def test_mllama_cross_attention_layer(benchmark, provider, device, dtype):
    pytest.importorskip("transformers")
    case = MllamaLayerCase("tiny")
    benchmark.group = f"mllama cross-attention layer {case.shape}"
    run(benchmark, case, provider, device, dtype, providers_of)


@pytest.mark.parametrize("provider", ["stock", "mmkernels"])
def test_transformer_decoder_training(benchmark, provider, device, dtype):
    case = DecoderTrainCase(2, 16, 40, 64, 4)
    benchmark.group = f"nn.TransformerDecoder training {case.shape}"
    run(benchmark, case, provider, device, dtype, providers_of)
