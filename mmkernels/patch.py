"""Swapping stock layers of an existing model for mmkernels layers, weights kept."""
import dataclasses

from torch import nn

from mmkernels.nn import ConcatWeightedFusion, CrossModalAttention

_ORIGINAL = "_mmkernels_original"


def _is_attention_fusion_module(module):
    """torchmultimodal's AttentionFusionModule, matched by class so the package is optional."""
    cls = type(module)
    return cls.__name__ == "AttentionFusionModule" and cls.__module__.startswith("torchmultimodal")


def _mha_refusal(module):
    if module.bias_k is not None:
        return "add_bias_kv=True changes the keys; kept as nn.MultiheadAttention"
    if module.add_zero_attn:
        return "add_zero_attn=True changes the keys; kept as nn.MultiheadAttention"
    return None


# kind -> (matches, why it can't be replaced or None, make the replacement)
RULES = {
    "MultiheadAttention": (lambda m: type(m) is nn.MultiheadAttention, _mha_refusal, CrossModalAttention.from_module),
    "AttentionFusionModule": (_is_attention_fusion_module, lambda m: None, ConcatWeightedFusion.from_module),
}


@dataclasses.dataclass
class PatchReport:
    replaced: list = dataclasses.field(default_factory=list)  # (path, old class, new class)
    left_alone: list = dataclasses.field(default_factory=list)  # (path, class, why)

    def __str__(self):
        lines = [f"mmkernels.patch: replaced {len(self.replaced)}, left {len(self.left_alone)} alone"]
        lines += [f"  replaced {p}: {old} -> {new}" for p, old, new in self.replaced]
        lines += [f"  left {p} ({cls}): {why}" for p, cls, why in self.left_alone]
        return "\n".join(lines)


def _children(model):
    for parent_path, parent in model.named_modules():
        for name, child in parent.named_children():
            yield parent, name, f"{parent_path}.{name}" if parent_path else name, child


def patch(model: nn.Module, *, include=None, verbose=False) -> PatchReport:
    """Replaces, in place, every stock module that mmkernels has a layer for (kinds in RULES;
    include= limits them) and returns what was replaced and what was left alone and why.
    The originals are kept for unpatch()."""
    kinds = set(RULES) if include is None else set(include)
    unknown = kinds - set(RULES)
    if unknown:
        raise ValueError(f"patch(include=...) must name kinds from {sorted(RULES)}, got {sorted(unknown)}")
    report = PatchReport()
    for parent, name, path, child in list(_children(model)):
        for kind, (matches, refusal, make) in RULES.items():
            if not matches(child):
                continue
            why = "not in include=" if kind not in kinds else refusal(child)
            if why:
                report.left_alone.append((path, type(child).__name__, why))
                break
            new = make(child)
            object.__setattr__(new, _ORIGINAL, child)  # not registered: stays out of state_dict
            setattr(parent, name, new)
            report.replaced.append((path, type(child).__name__, type(new).__name__))
            break
    if verbose:
        print(report)
    return report


def unpatch(model: nn.Module) -> int:
    """Puts back the modules patch() replaced; returns how many."""
    restored = 0
    for parent, name, _, child in list(_children(model)):
        original = getattr(child, _ORIGINAL, None)
        if original is not None:
            original.load_state_dict(child.state_dict())  # keep what was trained meanwhile
            setattr(parent, name, original)
            restored += 1
    return restored
