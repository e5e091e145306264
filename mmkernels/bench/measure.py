"""Timing and peak memory, the same way for every provider.

CUDA: CUDA events around each call, an L2 flush before it, warm-up, median (triton's do_bench
semantics). CPU: torch.utils.benchmark's blocked_autorange median. Peak memory: the caching
allocator's peak on CUDA; on CPU the rise of the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs) over the resident set before the call.
"""
import contextlib
import ctypes
import functools
import statistics
import subprocess
import sys
import time

import torch
import torch.utils.benchmark as tbench


def time_ms(fn, device: torch.device, min_run_time: float = 0.5) -> float:
    if device.type == "cuda":
        return _time_cuda(fn)
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def _time_cuda(fn, reps: int = 50, warmup: int = 10) -> float:
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


@functools.cache
def _libc():
    """glibc keeps freed blocks resident for reuse (and raises its mmap threshold as it goes), so
    the resident set would hide a later peak. A fixed threshold maps every block of 64 KiB or more
    on its own (unmapped on free), and malloc_trim before each measurement hands the pages of
    free heap chunks back, so whatever the call allocates is faulted in and counted."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if libc.mallopt(-3, 64 * 1024) == 1 else None  # M_MMAP_THRESHOLD
    except OSError:
        return None


def peak_memory_mib(fn, device: torch.device) -> float | None:
    """Extra memory at the peak of one call, or None where it can't be measured."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    libc = _libc()
    if libc is None:
        return None
    try:
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        before = _proc_status_kib("VmRSS")
        fn()
        return max(0, _proc_status_kib("VmHWM") - before) / 1024
    except OSError:
        return None


@functools.cache
def measured_peaks(device_type: str, dtype_name: str) -> dict:
    """What this device really sustains, measured once per run: a large matmul (TFLOP/s) and a
    device-to-device copy (GB/s, read + write). Fractions of these are honest on any machine,
    where a datasheet peak would not be (our CPUs share cores; clocks vary)."""
    device, dtype = torch.device(device_type), getattr(torch, dtype_name)
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    matmul_ms = time_ms(lambda: a @ a, device, min_run_time=0.3)
    src = torch.empty(256 * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, min_run_time=0.3)
    return {"TFLOP/s": 2 * n**3 / (matmul_ms * 1e-3) / 1e12, "GB/s": 2 * src.numel() * 4 / (copy_ms * 1e-3) / 1e9}


@contextlib.contextmanager
def busy_core():
    """Another process spinning on one core for the duration: a DataLoader worker, a tokenizer,
    a second job. The CPU kernels must not fall off a cliff beside it."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        yield
    finally:
        proc.kill()
        proc.wait()
