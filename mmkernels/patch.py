"""Swapping stock layers of an existing model for mmkernels layers, weights kept."""
import dataclasses
import weakref

from torch import nn

from mmkernels.nn import ConcatWeightedFusion, CrossModalAttention

# replacement -> the module it replaced, for unpatch(). Kept outside the modules so that
# torch.save(model) after patch() does not also save every original layer.
_ORIGINALS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def _is_attention_fusion_module(module):
    """torchmultimodal's AttentionFusionModule, matched by class so the package is optional."""
    cls = type(module)
    return cls.__name__ == "AttentionFusionModule" and cls.__module__.startswith("torchmultimodal")


# kind -> (matches, why it can't be replaced or None, make the replacement)
RULES = {
    "MultiheadAttention": (lambda m: type(m) is nn.MultiheadAttention, lambda m: None, CrossModalAttention.from_module),
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
    unpatch() puts the originals back (they are remembered by the process, not saved with
    the model)."""
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
            _ORIGINALS[new] = child
            new._mmkernels_patched = True  # a flag, saved with the model, so unpatch() knows it after loading
            setattr(parent, name, new)
            report.replaced.append((path, type(child).__name__, type(new).__name__))
            break
    if verbose:
        print(report)
    return report


def unpatch(model: nn.Module) -> int:
    """Puts back the modules patch() replaced, with what was trained meanwhile; returns how
    many. A patched model loaded from a file has no originals in this process: its patched
    CrossModalAttention layers become new nn.MultiheadAttention layers with their weights, and
    its other patched layers stay."""
    restored = 0
    for parent, name, _, child in list(_children(model)):
        original = _ORIGINALS.pop(child, None)
        if original is not None:
            original.load_state_dict(child.state_dict())
            original.train(child.training)
        elif type(child) is CrossModalAttention and getattr(child, "_mmkernels_patched", False):
            original = child.to_stock()
        else:
            continue
        setattr(parent, name, original)
        restored += 1
    return restored
