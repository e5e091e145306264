"""PNG plots of the sweeps in a bench CSV: speed-up against key length, memory against length."""
import collections
import csv
import os


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _length(shape, key):
    return int(next(p[len(key):] for p in shape.split() if p.startswith(key)))


def _best_mmkernels(rows, field):
    ours = [r for r in rows if r["provider"].startswith("mmkernels") and r[field]]
    return min(ours, key=lambda r: float(r[field])) if ours else None


def _draw(plt, series, path, title, xlabel, ylabel, log_y):
    """One line per series (label -> {x: y}) on a log2 x axis, saved to path."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
    if not log_y:
        ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(csv_path, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(csv_path)
    if not rows:
        return []
    device, dtype = rows[0]["device"], rows[0]["dtype"]
    stem = os.path.splitext(os.path.basename(csv_path))[0]
    by_case = collections.defaultdict(list)
    for r in rows:
        by_case[(r["op"], r["mode"], r["shape"], r["lengths"])].append(r)
    written = []

    # Speed-up of mmkernels over each peer against Lk, for the padded forward sweep.
    sweep = collections.defaultdict(dict)
    for (op, mode, shape, lengths), rs in by_case.items():
        ours = _best_mmkernels(rs, "time_ms")
        if op != "cross_attention" or mode != "fwd" or lengths == "-" or ours is None:
            continue
        prefix = shape.rsplit(" Lk", 1)[0]
        for r in rs:
            if r["time_ms"] and not r["provider"].startswith("mmkernels"):
                sweep[(prefix, r["provider"])][_length(shape, "Lk")] = float(r["time_ms"]) / float(ours["time_ms"])
    for prefix in sorted({p for p, _ in sweep}):
        series = {f"vs {provider}": pts for (p, provider), pts in sorted(sweep.items()) if p == prefix and len(pts) > 1}
        if series:
            written.append(_draw(plt, series, os.path.join(out_dir, f"{stem}-attention-speedup.png"),
                                 f"cross_attention fwd {prefix}, {dtype}\n{device}", "Lk (keys; kv_lengths uniform in [Lk/4, Lk])",
                                 "mmkernels speed-up (x)", log_y=False))

    # Peak memory of forward+backward against sequence length (the unpadded Lq = Lk sweep).
    memory = collections.defaultdict(dict)
    for (op, mode, shape, lengths), rs in by_case.items():
        if op == "cross_attention" and mode == "fwd+bwd" and lengths == "-" and _length(shape, "Lq") == _length(shape, "Lk"):
            for r in rs:
                if r["peak_mib"]:
                    memory[r["provider"]][_length(shape, "Lk")] = float(r["peak_mib"])
    memory = {p: pts for p, pts in sorted(memory.items()) if len(pts) > 1}
    if memory:
        written.append(_draw(plt, memory, os.path.join(out_dir, f"{stem}-attention-memory.png"),
                             f"cross_attention fwd+bwd memory, {dtype}\n{device}", "Lq = Lk", "peak memory of fwd+bwd (MiB)", log_y=True))
    return written
