"""The table printed by `mmkernels bench`, and the CSV rows."""
import csv
import datetime
import os
import subprocess

import torch


def _commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores)"


def best_mmkernels(results):
    timed = [r for r in results if r.provider.startswith("mmkernels") and r.time_ms]
    return min(timed, key=lambda r: r.time_ms) if timed else None


def speedup_text(ratio: float) -> str:
    """A peer's time over ours, in words: '2.50x faster', or '4.00x slower' (never '0.25x faster')."""
    return f"{ratio:6.2f}x faster" if ratio >= 1 else f"{1 / ratio:6.2f}x slower"


def format_case(results, dtype, peaks):
    case = results[0].case
    from mmkernels.bench.runner import unit as unit_of

    unit = unit_of(case)
    peak = peaks[unit]
    ours = best_mmkernels(results)
    what = "peak memory (one call)" if case.memory_only else "median time"
    lines = [f"\n{case.op} {case.mode} {case.shape} {dtype} lengths={results[0].lengths}  [{what}]"]
    lines.append(f"  {'provider':<18}{'ms':>10}{unit:>10}{'% peak':>8}{'peak MiB':>10}  mmkernels speed-up / memory ratio")
    if case.memory_only:  # one call each, not timed: peak memory and its ratio only
        measured = [r for r in results if r.peak_mib is not None]
        ours = min((r for r in measured if r.provider.startswith("mmkernels")), key=lambda r: r.peak_mib, default=None)
        for r in results:
            if r.peak_mib is None:
                lines.append(f"  {r.provider:<18}{r.note}")
                continue
            ratio = f"memory {ours.peak_mib / r.peak_mib:6.1%} of this" if ours is not None and r is not ours and r.peak_mib else ""
            lines.append(f"  {r.provider:<18}{'-':>10}{'-':>10}{'-':>8}{r.peak_mib:>10.1f}  {ratio}")
        return "\n".join(lines)
    for r in results:
        if r.time_ms is None:
            lines.append(f"  {r.provider:<18}{r.note}")
            continue
        ratio = ""
        if ours is not None and r is not ours:
            ratio = speedup_text(r.time_ms / ours.time_ms)
            if r.peak_mib and ours.peak_mib is not None:
                ratio += f"   memory {ours.peak_mib / r.peak_mib:6.1%} of this"
        lines.append(f"  {r.provider:<18}{r.time_ms:>10.3f}{r.throughput:>10.2f}{r.throughput / peak:>8.0%}{(r.peak_mib or 0):>10.1f}  {ratio}")
    return "\n".join(lines)


FIELDS = ["device", "dtype", "op", "mode", "shape", "lengths", "provider", "time_ms", "throughput", "throughput_unit", "fraction_of_peak", "peak_mib", "note", "commit", "date", "torch", "triton"]


def csv_rows(results, device, dtype, peaks):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    base = dict(device=device_name(device), dtype=str(dtype).removeprefix("torch."), commit=_commit(), date=datetime.date.today().isoformat(), torch=torch.__version__, triton=triton_version)
    from mmkernels.bench.runner import unit

    for r in results:
        yield dict(base, op=r.case.op, mode=r.case.mode, shape=r.case.shape, lengths=r.lengths, provider=r.provider,
                   time_ms=f"{r.time_ms:.4f}" if r.time_ms else "", throughput=f"{r.throughput:.3f}" if r.throughput else "",
                   throughput_unit=unit(r.case),
                   fraction_of_peak=f"{r.throughput / peaks[unit(r.case)]:.3f}" if r.throughput else "",
                   peak_mib=f"{r.peak_mib:.1f}" if r.peak_mib is not None else "", note=r.note)


def write_csv(path, rows) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _case_key(row) -> tuple:
    return tuple(row[k] for k in ("device", "dtype", "op", "mode", "shape", "lengths"))


def merge_csv(path, rows) -> str:
    """Writes rows into the CSV at path case by case: a case measured again replaces its old rows
    where they stood, the other cases stay, new cases are appended. Rows measured on another
    machine are dropped, not merged: one CSV, one machine, as the README names it."""
    rows = list(rows)
    if not rows:  # nothing measured (an --op with no case here): the CSV stays as it is
        return path
    old = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    devices = {r["device"] for r in rows}
    others = sorted({r["device"] for r in old} - devices)
    if others:
        print(f"{path}: dropping the rows measured on {', '.join(others)} (this run is on {', '.join(sorted(devices))})")
        old = [r for r in old if r["device"] in devices]
    new_by_case = {}
    for r in rows:
        new_by_case.setdefault(_case_key(r), []).append(r)
    merged, placed = [], set()
    for r in old:
        key = _case_key(r)
        if key not in new_by_case:
            merged.append(r)
        elif key not in placed:
            merged += new_by_case[key]
            placed.add(key)
    merged += [r for key, rs in new_by_case.items() if key not in placed for r in rs]
    return write_csv(path, merged)
