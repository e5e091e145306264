"""profile(): a whole model, stock against mmkernels, side by side in one process."""
import collections
import copy
import statistics
import time

import torch
from torch import nn

from mmkernels.bench.report import device_name
from mmkernels.profiling import events
from mmkernels.profiling.report import ModeResult, ModuleRow, ProfileResult

# whole-tensor tolerance: max |diff| <= atol + rtol * max |stock|. A whole model sums over many
# layers, so an elementwise rtol would fail on outputs near zero that a real bug would not produce.
TOLERANCES = {torch.float64: (1e-8, 1e-8), torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2),
              torch.bfloat16: (5e-2, 5e-2)}
TOP_OPS = 8
TOP_MODULES = 12


def profile(model, inputs, *, fused: nn.Module | None = None, backward: bool = True, trace: str | None = None,
            warmup: int = 1, iters: int = 3, loss=None, label: str | None = None, atol: float | None = None,
            rtol: float | None = None) -> ProfileResult:
    """Runs `model` stock and with mmkernels, checks they agree, and says what the swap did.

    model: an nn.Module (the stock side, left as it is), or a function of no arguments that
        builds one.
    inputs: what the model is called with: a dict (keywords), a tuple or list (positional
        arguments) or one tensor, already on the model's device.
    fused: the mmkernels side. Default: a deep copy of `model` with mmkernels.patch() applied
        and, for a transformers model, attn_implementation="mmkernels" (same weights).
    backward: also measure forward+backward, of `loss(output)` (default: the main output
        against a fixed random tensor, so every output element gets a gradient), and compare
        the parameters' gradients.
    trace: a path for a Chrome trace (chrome://tracing, Perfetto) of the profiled calls, each
        one labelled "mmkernels.profiling: <stock|mmkernels> <fwd|fwd+bwd>".
    warmup: untimed calls of each side before timing (at least 1: the first one's outputs are
        the ones compared). iters: timed calls of each, alternating sides; the median is kept.

    The forward is timed under torch.no_grad(), as inference runs. Both models run in the mode
    they are in: compare them in eval() (or with dropout 0), since dropout draws differ.
    """
    if not isinstance(model, nn.Module) and callable(model):
        model = model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"profile(model=...) must be an nn.Module or a function that builds one, got {type(model).__name__}")
    if not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"profile(warmup=...) must be an int >= 1 (the first warm-up call is compared), got {warmup!r}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"profile(iters=...) must be an int >= 1, got {iters!r}")
    if not isinstance(inputs, (dict, tuple, list, torch.Tensor)):
        raise TypeError(f"profile(inputs=...) must be a dict, tuple, list or tensor, got {type(inputs).__name__}")
    if fused is not None and not isinstance(fused, nn.Module):
        raise TypeError(f"profile(fused=...) must be an nn.Module or None, got {type(fused).__name__}")
    remarks = []
    if fused is None:
        fused, remarks = mmkernels_copy(model)
    changes, renamed = describe_changes(model, fused)
    changes = (changes or ["nothing: no layer or attention implementation differs from the stock model"]) + remarks
    device, dtype = _device_and_dtype(model, inputs)
    default_atol, default_rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    atol, rtol = default_atol if atol is None else atol, default_rtol if rtol is None else rtol
    sides = {"stock": model, "mmkernels": fused}
    modes = ["fwd", "fwd+bwd"] if backward else ["fwd"]
    steps = {(side, mode): _step(m, inputs, mode, loss, device) for side, m in sides.items() for mode in modes}

    compared, times = {}, {}
    for mode in modes:
        outs = {side: steps[side, mode]() for side in sides}
        compared[mode] = (_compare_outputs(*outs.values()) if mode == "fwd" else _compare_grads(model, fused))
        for _ in range(warmup - 1):
            for side in sides:
                steps[side, mode]()
        times[mode] = {side: [] for side in sides}
        for i in range(iters):
            for side in (sides if i % 2 == 0 else reversed(list(sides))):  # alternate who goes first: drift hits both
                times[mode][side].append(_timed(steps[side, mode], device))
        for m in sides.values():
            m.zero_grad(set_to_none=True)

    runs = _profiled(sides, modes, steps, device, trace)
    peaks = _peaks(sides, modes, steps, device)  # last: measuring changes how glibc allocates from then on

    results = []
    for mode in modes:
        diff, scale = compared[mode]
        stock_run, ours = runs["stock", mode], runs["mmkernels", mode]
        results.append(ModeResult(
            mode=mode, stock_ms=statistics.median(times[mode]["stock"]), mmkernels_ms=statistics.median(times[mode]["mmkernels"]),
            stock_peak_mib=peaks["stock", mode], mmkernels_peak_mib=peaks["mmkernels", mode],
            compared="outputs" if mode == "fwd" else "gradients", max_abs_diff=diff, max_abs_value=scale,
            agree=bool(diff <= atol + rtol * scale), fused_calls=ours.fused_calls,
            fused_share=ours.fused_us / ours.total_us if ours.total_us else 0.0, sdpa_calls=ours.sdpa_calls,
            stock_top_ops=_top_ops(stock_run), mmkernels_top_ops=_top_ops(ours)))
    result = ProfileResult(
        label=label or type(model).__name__, device=device_name(device), device_type=device.type,
        dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(), stock=describe_stock(model), changes=changes,
        modes=results, modules=_module_rows(runs["stock", "fwd"], runs["mmkernels", "fwd"], renamed, {type(model).__name__}),
        atol=atol, rtol=rtol, trace=trace)
    result.notes += _notes(result)
    return result


def _is_transformers_model(model) -> bool:
    from mmkernels.integrations.transformers import pretrained_models

    return pretrained_models(model) == [model]


def describe_stock(model) -> str:
    if _is_transformers_model(model):
        return f'transformers {type(model).__name__}, attn_implementation="{model.config._attn_implementation}"'
    return f"{type(model).__name__} as given"


def mmkernels_copy(model: nn.Module):
    """A deep copy running mmkernels wherever it can: patch() swaps the layers it has (and switches
    a transformers model to attn_implementation="mmkernels"). Returns it and what patch() could
    not do, in words."""
    import mmkernels

    fused = copy.deepcopy(model)
    report = mmkernels.patch(fused)
    remarks = [n for n in report.notes if "can't switch" in n]
    remarks += [f"patch() left {p} ({cls}) alone: {why}" for p, cls, why in report.left_alone[:3]]
    if len(report.left_alone) > 3:
        remarks.append(f"patch() left {len(report.left_alone) - 3} more alone")
    return fused, remarks


def describe_changes(stock: nn.Module, fused: nn.Module):
    """What differs between the two models, in words, and the module classes swapped at the same
    paths (old -> new), so the two sides' rows can be paired."""
    changes = []
    if _is_transformers_model(stock) and _is_transformers_model(fused):
        ours = fused.config._attn_implementation
        if ours != stock.config._attn_implementation:
            changes.append(f'attn_implementation="{ours}"')
    at = dict(stock.named_modules())
    swapped, inside_swapped = collections.Counter(), []
    for path, module in fused.named_modules():  # parents come before their children
        old = at.get(path)
        if old is None or type(old).__name__ == type(module).__name__:
            continue
        if any(path.startswith(p + ".") for p in inside_swapped):
            continue  # a new layer's own parts (CrossModalAttention's out_proj) are not another swap
        inside_swapped.append(path)
        swapped[type(old).__name__, type(module).__name__] += 1
    changes += [f"{n} {old} -> {new}" for (old, new), n in swapped.items()]
    return changes, {old: new for old, new in swapped}


def _device_and_dtype(model, inputs):
    for p in model.parameters():
        return p.device, p.dtype
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else [inputs]
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device, v.dtype if v.is_floating_point() else torch.float32
    return torch.device("cpu"), torch.float32


def main_output(out) -> torch.Tensor:
    """The tensor a model call is judged by: the tensor itself, else the first tensor of a tuple,
    a transformers ModelOutput (logits, last_hidden_state) or a dict."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else []
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"the model returned {type(out).__name__}, with no tensor to compare or differentiate")


def _call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model, inputs, mode, loss, device):
    """One call of `mode`, returning the main output; fwd+bwd starts with no gradients held, so
    each call allocates (and is measured with) its own."""
    probe = {}

    def default_loss(out):
        out = main_output(out)
        if out.shape not in probe:  # the same fixed direction for both sides
            g = torch.Generator().manual_seed(0)
            probe[out.shape] = torch.randn(out.shape, generator=g).to(out.device, torch.float32) / out.numel() ** 0.5
        return (out.float() * probe[out.shape]).sum()

    def fwd():
        with torch.no_grad():
            out = main_output(_call(model, inputs))
        _sync(device)
        return out

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        out = _call(model, inputs)
        (loss or default_loss)(out).backward()
        _sync(device)
        return main_output(out).detach()

    return fwd if mode == "fwd" else fwd_bwd


def _timed(step, device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3


def _max_diff(got, expected):
    if got.shape != expected.shape:
        return float("inf"), 0.0
    diff = (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0
    return diff, expected.double().abs().max().item() if expected.numel() else 0.0


def _compare_outputs(expected, got):
    return _max_diff(got, expected)


def _compare_grads(stock, fused):
    """Largest difference over the gradients of parameters both models have (patch() keeps
    parameter names), against the largest stock gradient. No gradient compared at all is a
    disagreement (inf), not a match."""
    theirs = dict(fused.named_parameters())
    diff = scale = 0.0
    compared = 0
    for name, p in stock.named_parameters():
        q = theirs.get(name)
        if p.grad is None or q is None:
            continue
        if q.grad is None:
            return float("inf"), 0.0
        d, s = _max_diff(q.grad, p.grad)
        diff, scale, compared = max(diff, d), max(scale, s), compared + 1
    return (diff, scale) if compared else (float("inf"), 0.0)


def _profiled(sides, modes, steps, device, trace):
    """Each (side, mode) once, in one profiler session; forward calls also label each module."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for mode in modes:
            for side, model in sides.items():
                with events.module_labels(model), torch.profiler.record_function(events.run_label(side, mode)):
                    steps[side, mode]()
    if trace:
        prof.export_chrome_trace(trace)
    evts = prof.events()
    runs = {(side, mode): events.analyse(evts, events.run_label(side, mode), device.type == "cuda")
            for mode in modes for side in sides}
    for model in sides.values():
        model.zero_grad(set_to_none=True)
    return runs


def _peaks(sides, modes, steps, device):
    from mmkernels.bench.measure import peak_memory_mib

    peaks = {}
    for mode in modes:
        for side, model in sides.items():
            peaks[side, mode] = peak_memory_mib(steps[side, mode], device)
            model.zero_grad(set_to_none=True)
    return peaks


def _top_ops(run: events.RunProfile):
    ranked = sorted(run.op_self_us.items(), key=lambda kv: -kv[1])[:TOP_OPS]
    return [(name, us / 1e3, us / run.total_us if run.total_us else 0.0) for name, us in ranked]


def _module_rows(stock: events.RunProfile, ours: events.RunProfile, renamed: dict, roots: set) -> list:
    """Module classes by the larger of their two times; a class patch() replaced shares a row
    with its replacement. The whole model's own class (100% of the time) is left out."""
    names = {}
    for cls in stock.module_us:
        names.setdefault(renamed.get(cls, cls), [None, None])[0] = cls
    for cls in ours.module_us:
        names.setdefault(cls, [None, None])[1] = cls
    rows = []
    for old, new in names.values():
        if (old or new) in roots:
            continue
        label = f"{old} -> {new}" if old and new and old != new else (new or old)
        rows.append(ModuleRow(name=label, stock_calls=stock.module_calls.get(old, 0), mmkernels_calls=ours.module_calls.get(new, 0),
                              stock_ms=stock.module_us[old] / 1e3 if old else None,
                              mmkernels_ms=ours.module_us[new] / 1e3 if new else None,
                              fused=ours.module_fused.get(new, 0) if new else 0))
    rows.sort(key=lambda r: -max(r.stock_ms or 0, r.mmkernels_ms or 0))
    return rows[:TOP_MODULES]


def _notes(result: ProfileResult) -> list:
    notes = []
    if all(m.n_fused == 0 for m in result.modes):
        notes.append("no mmkernels op ran in the mmkernels model: nothing in it was replaced, both sides compute the same way")
    left = max(m.sdpa_calls for m in result.modes)
    if left:
        notes.append(f"{left} attention calls of the mmkernels model still went to torch's SDPA (masks the kernels can't "
                     "express, or attention mmkernels does not cover)")
    if any(m.stock_peak_mib is None for m in result.modes):
        notes.append("peak memory could not be measured here")
    if not result.agree:
        bad = ", ".join(f"{m.mode} {m.compared}" for m in result.modes if not m.agree)
        notes.append(f"the two models DISAGREE ({bad}): the timings compare different computations")
    return notes
