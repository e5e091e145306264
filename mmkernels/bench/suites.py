"""The curated sweeps: what `mmkernels bench` runs for the device it finds."""
from mmkernels.bench.co_attention import CoAttentionCase
from mmkernels.bench.concat_weighted_fusion import ConcatWeightedFusionCase
from mmkernels.bench.cross_attention import AttentionCase, MaskedAttentionCase
from mmkernels.bench.decision_fusion import DecisionCase
from mmkernels.bench.gated_fusion import GatedFusionCase
from mmkernels.bench.gated_residual_linear import GatedResidualCase
from mmkernels.bench.linear_fusion import LinearCase
from mmkernels.bench.models import DecoderTrainCase, GenerateCase, MhaLayerCase, MllamaLayerCase
from mmkernels.bench.varlen_attention import VarlenCase


def mask_cases(device_type: str):
    """The masks real models pass: two interleaved images as
    per-row key ranges, a right-padded key_padding_mask against the equal kv_lengths, and a
    Llama-3.2-Vision cross-attention layer at real widths."""
    D = 64 if device_type == "cpu" else 128
    return [
        MaskedAttentionCase(2, 8, 2, 512, 2048, D, "images", mode="fwd"),
        MaskedAttentionCase(2, 8, 2, 512, 2048, D, "images", mode="fwd+bwd"),
        MaskedAttentionCase(4, 8, 8, 128, 1024, D, "padding", mode="fwd"),
        MllamaLayerCase("real", mode="fwd"),
        DecoderTrainCase(4, 256, 1024, 512, 8) if device_type == "cpu" else DecoderTrainCase(8, 1024, 4096, 1024, 16),
    ]


def small_call_cases():
    """Where per-call overhead is the cost ("overhead"): one tiny call, a layer at Lq 1 against
    nn.MultiheadAttention, the fusion ops on one row; and decoding ("decode", "generate"): one
    query row over a full cache, with and without grouped-query heads, and greedy generation."""
    return [
        AttentionCase(1, 8, 1, 64, 64, padded=False, mode="fwd"),
        AttentionCase(1, 8, 1, 64, 64, padded=False, mode="fwd+bwd"),
        MaskedAttentionCase(1, 32, 32, 1, 1601, 128, "none", mode="fwd"),
        MaskedAttentionCase(1, 32, 8, 1, 1601, 128, "none", mode="fwd"),
        MaskedAttentionCase(8, 32, 8, 1, 4096, 128, "none", mode="fwd"),
        MhaLayerCase(512, 8, 1, 64),
        # The fusion ops on one row, against their eager composites.
        ConcatWeightedFusionCase(3, 1, 768, mode="fwd"),
        LinearCase(3, 1, 256, 512, mode="fwd"),
        DecisionCase(3, 1, 1000, mode="fwd"),
        GatedFusionCase(1, 768, 512, 512, mode="fwd"),
        GatedResidualCase(1, 1024, 1024, mode="fwd"),
        GenerateCase("tiny"),
        GenerateCase("small"),
        GenerateCase("small", padded=True),
    ]


def cpu_cases(full: bool):
    cases = [
        *small_call_cases(),
        # The CPU targets of the design card (fp32, 2 cores).
        AttentionCase(4, 8, 128, 1024, 64, padded=True, mode="fwd"),
        AttentionCase(4, 8, 128, 1024, 64, padded=True, mode="fwd+bwd"),
        AttentionCase(4, 8, 128, 1024, 64, padded=False, mode="fwd"),
        AttentionCase(1, 8, 4096, 4096, 64, padded=False, mode="fwd+bwd", memory_only=True),
        ConcatWeightedFusionCase(3, 65536, 768, mode="fwd"),
        ConcatWeightedFusionCase(3, 65536, 768, mode="fwd+bwd"),
        # The fusion family's CPU targets.
        LinearCase(3, 16384, 256, 512, mode="fwd+bwd"),
        DecisionCase(3, 16384, 1000, mode="fwd"),
        DecisionCase(3, 16384, 1000, mode="fwd+bwd"),
        GatedFusionCase(16384, 768, 512, 512, mode="fwd+bwd"),
        GatedResidualCase(8192, 1024, 1024, mode="fwd+bwd"),
        CoAttentionCase(2, 8, 64, 256, 64, mode="fwd"),
        *mask_cases("cpu"),
        # Packed sequences (flash-attn's varlen layout): 8 documents of 64 to 512 tokens.
        VarlenCase((512, 64, 300, 128, 450, 96, 200, 350), 8, 64, mode="fwd"),
        VarlenCase((512, 64, 300, 128, 450, 96, 200, 350), 8, 64, mode="fwd+bwd"),
    ]
    # Sweeps for the plots: speed-up and memory against key length.
    for Lk in (256, 512, 2048) + ((4096,) if full else ()):
        cases.append(AttentionCase(4, 8, 128, Lk, 64, padded=True, mode="fwd"))
    for L in (1024, 2048):
        cases.append(AttentionCase(1, 8, L, L, 64, padded=False, mode="fwd+bwd", memory_only=True))
    if full:
        cases += [
            AttentionCase(4, 8, 512, 4096, 128, padded=True, mode="fwd"),
            ConcatWeightedFusionCase(2, 16384, 2048, mode="fwd+bwd"),
            ConcatWeightedFusionCase(4, 262144, 256, mode="fwd+bwd"),
        ]
    return cases


def cuda_cases(full: bool):
    cases = []
    for L in (1024, 4096):
        cases.append(AttentionCase(16384 // L * 4, 16, L, L, 128, padded=False, mode="fwd"))
    cases += [
        AttentionCase(8, 16, 512, 4096, 128, padded=True, mode="fwd"),
        AttentionCase(16, 16, 1024, 1024, 128, padded=False, mode="fwd+bwd"),
        AttentionCase(8, 16, 512, 4096, 128, padded=True, mode="fwd+bwd"),
        ConcatWeightedFusionCase(3, 262144, 1024, mode="fwd"),
        ConcatWeightedFusionCase(3, 262144, 1024, mode="fwd+bwd"),
        LinearCase(3, 65536, 1024, 1024, mode="fwd+bwd"),
        # Small shapes, where one launch instead of two matters.
        CoAttentionCase(2, 8, 32, 64, 64, mode="fwd"),
        CoAttentionCase(2, 8, 32, 64, 64, mode="fwd+bwd"),
        DecisionCase(3, 65536, 1000, mode="fwd"),
        GatedFusionCase(65536, 1024, 1024, 1024, mode="fwd+bwd"),
        GatedResidualCase(32768, 4096, 4096, mode="fwd+bwd"),
        *mask_cases("cuda"),
    ]
    for Lk in (256, 1024, 2048) + ((8192,) if full else ()):
        cases.append(AttentionCase(8, 16, 512, Lk, 128, padded=True, mode="fwd"))
    for L in (1024, 2048, 4096, 8192):
        cases.append(AttentionCase(1, 16, L, L, 128, padded=False, mode="fwd+bwd", memory_only=True))
    return cases
