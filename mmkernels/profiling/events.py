"""Reading one torch.profiler session in which each labelled call (stock or mmkernels, forward
or forward+backward) ran once: where its time went, by module class and by op, and how much of
it was spent in mmkernels' operators."""
import bisect
import collections
import contextlib
import dataclasses

import torch
from torch.autograd import DeviceType

RUN = "mmkernels.profiling: "  # record_function label around each profiled call
MODULE = "module: "  # record_function label around each module's forward
FUSED = "mmkernels::"
SDPA = "aten::scaled_dot_product_attention"


def run_label(side: str, mode: str) -> str:
    return f"{RUN}{side} {mode}"


@contextlib.contextmanager
def module_labels(model: torch.nn.Module):
    """Wraps every module's forward in a record_function named after its class, so the profile
    can say which layers the time went to (torch.profiler's with_modules covers TorchScript only).
    The hooks are gone afterwards: timed calls never run them."""
    open_labels = collections.defaultdict(list)

    def enter(module, _args):
        label = torch.profiler.record_function(MODULE + type(module).__name__)
        label.__enter__()
        open_labels[id(module)].append(label)

    def leave(module, _args, _output):
        if open_labels[id(module)]:
            open_labels[id(module)].pop().__exit__(None, None, None)

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclasses.dataclass
class RunProfile:
    """One labelled call. Times are in microseconds: CPU time on a CPU, kernel time on a GPU."""

    total_us: float
    op_self_us: dict  # op name -> self time
    module_us: dict  # module class -> inclusive time (nested calls of one class counted once)
    module_calls: dict  # module class -> calls
    module_fused: dict  # module class -> mmkernels ops run inside it
    fused_calls: dict  # mmkernels op -> calls (outermost only: a kernel an op calls is not another call)
    fused_us: float
    sdpa_calls: int  # attention that still went to torch's SDPA


def _outermost(event, prefix: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefix):
            return False
        parent = parent.cpu_parent
    return True


def _merged(intervals):
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _inside(merged, t) -> bool:
    i = bisect.bisect_right(merged, [t, float("inf")]) - 1
    return i >= 0 and merged[i][0] <= t < merged[i][1]


def analyse(events, label: str, on_gpu: bool) -> RunProfile:
    """The events that started inside `label`, on any thread (a GPU's backward runs on another
    one). On a GPU each op's time is the kernel time it launched; on a CPU its CPU time."""
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    runs = [e for e in cpu if e.name == label]
    if not runs:
        raise RuntimeError(f"the profile has no event labelled {label!r}")
    start, end = runs[0].time_range.start, runs[0].time_range.end
    mine = [e for e in cpu if start <= e.time_range.start < end]

    def self_us(e):
        return e.self_device_time_total if on_gpu else e.self_cpu_time_total

    def total_us(e):
        return e.device_time_total if on_gpu else e.cpu_time_total

    ops = collections.Counter()
    classes = collections.defaultdict(list)
    fused = [e for e in mine if e.name.startswith(FUSED) and _outermost(e, FUSED)]
    for e in mine:
        if e.name.startswith(MODULE):
            classes[e.name[len(MODULE):]].append((e.time_range.start, e.time_range.end))
        elif not e.name.startswith(RUN):
            ops[e.name] += self_us(e)
    module_us, module_fused = {}, {}
    for cls, intervals in classes.items():
        merged = _merged(intervals)
        module_us[cls] = sum(self_us(e) for e in mine if _inside(merged, e.time_range.start))
        module_fused[cls] = sum(_inside(merged, e.time_range.start) for e in fused)
    return RunProfile(
        total_us=sum(self_us(e) for e in mine),
        op_self_us=dict(ops),
        module_us=module_us,
        module_calls={cls: len(v) for cls, v in classes.items()},
        module_fused=module_fused,
        fused_calls=dict(collections.Counter(e.name for e in fused)),
        fused_us=sum(total_us(e) for e in fused),
        sdpa_calls=sum(1 for e in mine if e.name == SDPA and _outermost(e, SDPA) and _outermost(e, FUSED)),
    )
