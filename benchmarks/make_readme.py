"""Regenerates the README's generated sections: the support table from the ops' specs
(mmkernels/spec.py) and the performance section from benchmarks/results/*.csv, so both are
always what the code declares and what was measured: python benchmarks/make_readme.py"""
import collections
import csv
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
SUPPORT_START, SUPPORT_END = "<!-- support:start -->", "<!-- support:end -->"
PROFILE_START, PROFILE_END = "<!-- profile:start -->", "<!-- profile:end -->"
EFFICIENCY_START, EFFICIENCY_END = "<!-- efficiency:start -->", "<!-- efficiency:end -->"
EFFICIENCY_JSON = os.path.join(ROOT, "benchmarks", "results", "efficiency.json")
PEERS = ["eager", "sdpa", "sdpa-loop", "sdpa-math", "sdpa-flash", "sdpa-cudnn", "flex", "compile", "flash-attn", "transformers-sdpa", "stock"]


def ratio_cell(ratio: float) -> str:
    """A peer's time over ours, as bench prints it, less the word "faster": '1.46x', '1.20x slower'."""
    from mmkernels.bench.report import speedup_text

    return speedup_text(ratio).strip().removesuffix(" faster")


def memory_table(cases) -> list[str]:
    """The cases measured for peak memory only (one call each, not timed): MiB per provider."""
    if not cases:
        return []
    providers = list(dict.fromkeys(r["provider"] for _, _, _, rs in cases for r in rs if r["peak_mib"]))
    out = ["", "Peak memory of one call, in MiB above the resident set before it (these cases are not timed):", "",
           "| case | " + " | ".join(providers) + " |", "|---|" + "---|" * len(providers)]
    for op, mode, shape, rs in cases:
        by = {r["provider"]: r["peak_mib"] or "-" for r in rs}
        out.append(f"| {op} {mode} {shape} | " + " | ".join(by.get(p, "-") for p in providers) + " |")
    return out


def section(path):
    from mmkernels.bench.runner import MEMORY_ONLY

    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return ""
    cases = collections.defaultdict(list)
    for r in rows:
        cases[(r["op"], r["mode"], r["shape"], r["lengths"])].append(r)
    peers = [p for p in PEERS if any(r["provider"] == p and r["time_ms"] for r in rows)]
    first = rows[0]
    load = " **with another process keeping one core busy**" if path.endswith("-load.csv") else ", idle"
    runs = list(dict.fromkeys(f"commit {r['commit']}, {r['date']}" for r in rows))  # cases merged in later by bench --save
    when = runs[0] if len(runs) == 1 else f"{runs[0]} (cases added by `bench --save`: {'; '.join(runs[1:])})"
    out = [f"**{first['device']}**{load}, {first['dtype']}, torch {first['torch']}, {when} "
           f"([csv]({os.path.relpath(path, ROOT)})). Speed-up = peer time / mmkernels time; "
           "TFLOP/s count only unpadded keys.\n",
           "| case | lengths | mmkernels ms | " + " | ".join(f"vs {p}" for p in peers) + " | peak MiB (ours / eager) |",
           "|---|---|---|" + "---|" * len(peers) + "---|"]
    notes, memory_cases = [], []
    for (op, mode, shape, lengths), rs in cases.items():
        by = {r["provider"]: r for r in rs}
        mask, by_lengths = by.get("mmkernels-cpu-mask") or by.get("mmkernels-cuda-mask"), by.get("mmkernels-cpu-lengths") or by.get("mmkernels-cuda-lengths")
        if mask and by_lengths and mask["time_ms"] and by_lengths["time_ms"]:
            notes.append(f"{op} {mode} {shape}, right-padded: key_padding_mask {float(mask['time_ms']):.2f} ms, "
                         f"the equal kv_lengths {float(by_lengths['time_ms']):.2f} ms "
                         f"({float(mask['time_ms']) / float(by_lengths['time_ms']):.2f}x the time).")
        if any(r["note"] == MEMORY_ONLY for r in rs):
            memory_cases.append((op, mode, shape, rs))
            continue
        ours = [r for r in rs if r["provider"].startswith("mmkernels") and r["time_ms"]]
        if not ours:
            continue
        best = min(ours, key=lambda r: float(r["time_ms"]))
        cells = []
        for p in peers:
            r = by.get(p)
            cells.append(ratio_cell(float(r["time_ms"]) / float(best["time_ms"])) if r and r["time_ms"] else "n/a")
        eager_mem = by.get("eager", {}).get("peak_mib") or "-"
        name = f"{op} {mode} {shape} ({best['provider'].removeprefix('mmkernels-')}, {float(best['throughput']):.2f} {best['throughput_unit']})"
        lens = "full" if lengths == "-" else ("ragged" if re.fullmatch(r"[\d/]+", lengths) else lengths)
        out.append(f"| {name} | {lens} | {float(best['time_ms']):.2f} | " + " | ".join(cells) + f" | {best['peak_mib'] or '-'} / {eager_mem} |")
    out += memory_table(memory_cases)
    base = os.path.splitext(path)[0]
    plots = sorted(p for p in glob.glob(base + "-*.png") if path.endswith("-load.csv") or not p.startswith(base + "-load"))
    out += [""] + notes + [""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, ROOT)})" for p in plots]
    return "\n".join(out)


def replace_between(text, start, end, body):
    return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{body}\n{end}", text, flags=re.S)


def support_section():
    import mmkernels  # noqa: F401  (registers every op's spec)
    from mmkernels.spec import support_table

    return support_table()


def profile_section():
    """`mmkernels profile --size real` on a CPU: benchmarks/results/profile-cpu-*.csv, with the
    machine line of the run's text report beside it."""
    from mmkernels.bench.report import speedup_text

    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "profile-*.csv"))):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        text = os.path.splitext(path)[0] + ".txt"
        machine = ""
        if os.path.exists(text):  # its header: from the "machine:" line to the "idle:"/"load:" line
            with open(text) as f:
                lines = [line.strip() for line in f]
            start = next((i for i, line in enumerate(lines) if line.startswith("machine:")), None)
            end = next((i for i, line in enumerate(lines) if line.startswith(("idle:", "load:"))), start)
            if start is not None:
                machine = " ".join(lines[start:end + 1]).removeprefix("machine: ")
        out += [f"{machine} ([csv]({os.path.relpath(path, ROOT)}), per-module tables in "
                f"[{os.path.basename(text)}]({os.path.relpath(text, ROOT)})). Speed-up = stock time / mmkernels time.\n",
                "| recipe | size | mode | stock ms | mmkernels ms | speed-up | peak MiB (stock / mmkernels) | time in fused ops | max abs diff |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ratio = speedup_text(float(r["stock_ms"]) / float(r["mmkernels_ms"])).strip()
            out.append(f"| {r['recipe']} | {r['size']} | {r['mode']} | {float(r['stock_ms']):.0f} | {float(r['mmkernels_ms']):.0f} | "
                       f"{ratio} | {r['stock_peak_mib']} / {r['mmkernels_peak_mib']} | {float(r['fused_share']):.0%} | {r['max_abs_diff']} |")
        out.append("")
    return "\n".join(out).strip() or "No profile committed yet."


def efficiency_section():
    """tools/compile_gpu.py --efficiency --cuda --json benchmarks/results/efficiency.json: the
    kernels compiled for sm_90 and sm_80 without a GPU, float16 rows (bfloat16's are in the JSON)."""
    import json

    if not os.path.exists(EFFICIENCY_JSON):
        return "No efficiency table committed yet."
    with open(EFFICIENCY_JSON) as f:
        rows = json.load(f)
    first = rows[0]
    out = [f"Compiled by `tools/compile_gpu.py --efficiency --cuda` (Triton {first.get('triton')}, its bundled ptxas; nvcc "
           f"for the CUDA C++ rows) on commit {first.get('commit')}, no GPU: "
           f"[json]({os.path.relpath(EFFICIENCY_JSON, ROOT)}), which also holds the bfloat16 rows. "
           "flop/instr = tensor-core FLOPs per issued instruction of the main loop, from the SASS; "
           "vs tutorial = that over the same measure of Triton's tutorial fused attention compiled the same way "
           "(its forward for fwd, its backward for dQ and dK/dV). These are compiler proxies, not speed.\n",
           "| target | backend | kernel | variant | hd | tile | warps/stages | regs | spill B | smem B | warps/SM | async loads | MMA | flop/instr | vs tutorial |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("dtype") != "float16":
            continue
        name = "tutorial" if r.get("anchor") else r.get("backend", "triton")
        if "block_m" not in r:
            out.append(f"| {r['target']} | {name} | {r['kernel']} | {r['variant']} | {r['head_dim']} | {r['verdict']} |" + " |" * 9)
            continue
        ratio = f"{r['vs_anchor']:.2f}x" if r.get("vs_anchor") else "-"
        out.append(f"| {r['target']} | {name} | {r['kernel']} | {r['variant']} | {r['head_dim']} | {r['block_m']}x{r['block_n']} | "
                   f"{r['num_warps']}/{r['num_stages']} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | "
                   f"{r['warps_per_sm'] or '-'} | {'yes' if r['async_loads'] else 'no'} | {r['mma'] or '-'} | "
                   f"{r['flop_per_instr']:.0f} | {ratio} |")
    return "\n".join(out)


def main():
    paths = sorted((p for p in glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.csv"))
                    if not os.path.basename(p).startswith("profile-")), key=lambda p: (p.endswith("-load.csv"), p))
    body = "\n\n".join(filter(None, (section(p) for p in paths))) or "No results committed yet."
    readme_path = os.path.join(ROOT, "README.md")
    with open(readme_path) as f:
        readme = f.read()
    new = replace_between(readme, START, END, body)
    new = replace_between(new, SUPPORT_START, SUPPORT_END, support_section())
    new = replace_between(new, PROFILE_START, PROFILE_END, profile_section())
    new = replace_between(new, EFFICIENCY_START, EFFICIENCY_END, efficiency_section())
    with open(readme_path, "w") as f:
        f.write(new)


if __name__ == "__main__":
    main()
