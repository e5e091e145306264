"""Swapping stock layers of an existing model for mmkernels layers, weights kept."""
import dataclasses
import weakref

from torch import nn

from mmkernels.nn import ConcatWeightedFusion, CrossModalAttention
from mmkernels.nn.cross_modal_attention import STOCK_MHA as StockMHA

# Every parameter nn.MultiheadAttention may own; a subclass with others can't be swapped losslessly.
MHA_PARAMETERS = {"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k", "bias_v",
                  "out_proj.weight", "out_proj.bias"}

# replacement -> the module it replaced, for unpatch(). Kept outside the modules so that
# torch.save(model) after patch() does not also save every original layer.
_ORIGINALS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def _is_attention_fusion_module(module):
    """torchmultimodal's AttentionFusionModule, matched by class so the package is optional."""
    cls = type(module)
    return cls.__name__ == "AttentionFusionModule" and cls.__module__.startswith("torchmultimodal")


def _is_mha(module) -> bool:
    return isinstance(module, StockMHA)


def _mha_refusal(module) -> str | None:
    """Why an nn.MultiheadAttention (or a subclass) can't be swapped, or None."""
    cls = type(module)
    if cls is StockMHA:
        return None
    if cls.forward is not StockMHA.forward:
        return f"{cls.__name__} overrides forward(): its own attention code would be lost"
    extra = sorted(set(dict(module.named_parameters())) - MHA_PARAMETERS) + sorted(name for name, _ in module.named_buffers())
    if extra:
        return f"{cls.__name__} adds parameters or buffers ({', '.join(extra)}) that the replacement would not carry"
    return None


# What a replaced MultiheadAttention runs, and its per-call exceptions.
MHA_NOTE = ("attention layers run fused, dropout, key padding, causal and one-span masks included; per call, only a float "
            "bias or a mask with holes inside a row falls back to SDPA (each layer's last_fallback says why), and a call "
            "with need_weights=True (nn.MultiheadAttention's default) also computes the (L, S) weights beside the kernel")

# kind -> (matches, why it can't be replaced or None, make the replacement, how the replacement runs)
RULES = {
    "MultiheadAttention": (_is_mha, _mha_refusal, CrossModalAttention.from_module, "fused"),
    "AttentionFusionModule": (_is_attention_fusion_module, lambda m: None, ConcatWeightedFusion.from_module, "fused, always"),
}


@dataclasses.dataclass
class PatchReport:
    """What patch() did: replaced (path, old class, new class), left_alone (path, class, why),
    runs (path -> how the replacement runs), and notes. After the model has run, str(report)
    also counts each replaced attention layer's fused and fallback calls, with the last reason."""

    replaced: list = dataclasses.field(default_factory=list)
    left_alone: list = dataclasses.field(default_factory=list)
    runs: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)
    modules: dict = dataclasses.field(default_factory=dict, repr=False)  # path -> weakref to the new module

    def calls(self) -> dict:
        """path -> (fused calls, fallback calls, last fallback reason) of each replaced attention layer."""
        out = {}
        for path, ref in self.modules.items():
            m = ref()
            if isinstance(m, CrossModalAttention):
                out[path] = (m.fused_calls, m.fallback_calls, m.last_fallback)
        return out

    def __str__(self):
        lines = [f"mmkernels.patch: replaced {len(self.replaced)}, left {len(self.left_alone)} alone"]
        calls = self.calls()
        for p, old, new in self.replaced:
            fused, fallback, why = calls.get(p, (0, 0, None))
            so_far = f"; so far {fused} fused calls, {fallback} fallbacks" + (f" (last: {why})" if fallback else "")
            lines.append(f"  replaced {p}: {old} -> {new} (runs {self.runs.get(p, 'fused')}{so_far if fused or fallback else ''})")
        lines += [f"  left {p} ({cls}): {why}" for p, cls, why in self.left_alone]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _children(model):
    """Every (parent, attribute, path, child) edge of the module graph: a module shared by two
    parents comes once per parent (named_modules() would list it once)."""
    for parent_path, parent in model.named_modules(remove_duplicate=True):
        for name, child in parent._modules.items():
            if child is not None:
                yield parent, name, f"{parent_path}.{name}" if parent_path else name, child


def _adopt_parameters(new: nn.Module, old: nn.Module):
    """The replacement holds the original's Parameter and buffer objects, not copies: weights tied
    to other modules stay tied, and an optimizer made before patch() still updates the model."""
    for kind in ("_parameters", "_buffers"):
        for path, value in (old.named_parameters(remove_duplicate=False) if kind == "_parameters"
                            else old.named_buffers(remove_duplicate=False)):
            *owner_path, leaf = path.split(".")
            owner = new.get_submodule(".".join(owner_path)) if owner_path else new
            current = getattr(owner, kind).get(leaf)
            if current is not None and current.shape == value.shape and current.dtype == value.dtype:
                getattr(owner, kind)[leaf] = value


def patch(model: nn.Module, *, include=None, verbose: bool = False) -> PatchReport:
    """Replaces, in place, every stock module that mmkernels has a layer for (kinds in RULES:
    nn.MultiheadAttention and its subclasses that keep its forward and parameters, torchmultimodal's
    AttentionFusionModule) and returns what was replaced, how it will run, and what was left alone
    and why. Kind "attn_implementation": a Hugging Face transformers model (or one inside the
    model), whose attention runs in functions, is switched to attn_implementation="mmkernels"
    where it allows that. include= limits the kinds.
    The module graph is kept: a module shared by two parents gets one shared replacement, and a
    replacement holds its original's Parameter objects, so tied weights stay tied (and an optimizer
    made before patch() keeps working). A bare supported module (patch(mha)) raises: patch()
    cannot swap the object its caller holds; from_module() makes the replacement.
    unpatch() puts the originals back (they are remembered by the process, not saved with the
    model)."""
    known = {*RULES, "attn_implementation"}
    kinds = known if include is None else set(include)
    unknown = kinds - known
    if unknown:
        raise ValueError(f"patch(include=...) must name kinds from {sorted(known)}, got {sorted(unknown)}")
    for kind, (matches, _, make, _) in RULES.items():
        if matches(model):
            raise ValueError(f"patch() replaces the modules inside a model, in place; this is a bare {type(model).__name__}, "
                             f"which it cannot replace in its caller's hands: use {make.__qualname__.split('.')[0]}"
                             f".from_module(module) and keep what it returns")
    report = PatchReport()
    replaced = {}  # id(original) -> (replacement, first path): a shared module gets one shared replacement
    for parent, name, path, child in list(_children(model)):
        if id(child) in replaced:
            new, first = replaced[id(child)]
            setattr(parent, name, new)
            report.notes.append(f"{path} is the same module as {first}: it shares the one replacement")
            continue
        for kind, (matches, refusal, make, runs) in RULES.items():
            if not matches(child):
                continue
            why = "not in include=" if kind not in kinds else refusal(child)
            if why:
                report.left_alone.append((path, type(child).__name__, why))
                break
            new = make(child)
            _adopt_parameters(new, child)
            _ORIGINALS[new] = child
            new._mmkernels_patched = True  # a flag, saved with the model, so unpatch() knows it after loading
            setattr(parent, name, new)
            replaced[id(child)] = (new, path)
            report.replaced.append((path, type(child).__name__, type(new).__name__))
            report.runs[path], report.modules[path] = runs, weakref.ref(new)
            break
    if any(isinstance(ref(), CrossModalAttention) for ref in report.modules.values()):
        report.notes.append(MHA_NOTE)
    if "attn_implementation" in kinds:
        _transformers_attention(model, report)
    if verbose:
        print(report)
    return report


def _transformers_attention(model: nn.Module, report: PatchReport):
    """A Hugging Face model computes attention in functions, not in nn.MultiheadAttention
    modules: switch each one to attn_implementation="mmkernels" where it allows that, else say how."""
    from mmkernels.integrations import transformers as mmt

    for hf in mmt.pretrained_models(model):
        name, previous = type(hf).__name__, getattr(hf.config, "_attn_implementation", None)
        if previous == mmt.NAME:
            report.notes.append(f"{name} already uses attn_implementation={mmt.NAME!r}")
        elif not isinstance(previous, str) or not hf._can_set_attn_implementation():
            report.notes.append(f"{name} can't switch its attention implementation after loading: build it with "
                                f"attn_implementation={mmt.NAME!r} after mmkernels.integrations.transformers.register()")
        else:
            mmt.register()
            hf.set_attn_implementation(mmt.NAME)
            hf._mmkernels_previous_attn_implementation = previous
            report.notes.append(f"{name}: attn_implementation {previous!r} -> {mmt.NAME!r} (its attention runs in functions, "
                                "not modules; unpatch() switches it back)")


def unpatch(model: nn.Module) -> int:
    """Puts back the modules patch() replaced, with what was trained meanwhile, and the attention
    implementation of the transformers models it switched; returns how many of both. A patched model loaded from a file has no
    originals in this process: its patched CrossModalAttention layers become new
    nn.MultiheadAttention layers with their weights, and its other patched layers stay."""
    from mmkernels.integrations import transformers as mmt

    restored = 0
    for hf in mmt.pretrained_models(model):
        if hasattr(hf, "_mmkernels_previous_attn_implementation"):
            hf.set_attn_implementation(hf._mmkernels_previous_attn_implementation)
            del hf._mmkernels_previous_attn_implementation
            restored += 1
    originals = {}  # id(replacement) -> original: a shared replacement gives back one shared original
    for parent, name, _, child in list(_children(model)):
        if id(child) in originals:
            setattr(parent, name, originals[id(child)])
            continue
        original = _ORIGINALS.pop(child, None)
        if original is not None:
            original.load_state_dict(child.state_dict())  # the same Parameter objects unless replaced since
            original.train(child.training)
        elif type(child) is CrossModalAttention and getattr(child, "_mmkernels_patched", False):
            original = child.to_stock()
        else:
            continue
        originals[id(child)] = original
        setattr(parent, name, original)
        restored += 1
    return restored
