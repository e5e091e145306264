"""`mmkernels bench`: the curated sweep for the device it finds, a table, a CSV and plots.

Results go to a fresh temporary folder unless --out names one; --save merges them, case by case,
into the checkout's benchmarks/results/ (where the README's numbers come from). tqdm and
matplotlib (the [bench] extra) are optional: without them a plain progress line, no plots."""
import argparse
import contextlib
import os
import tempfile

import torch

from mmkernels.ops.checks import fail

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks", "results")


def op_choices() -> list[str]:
    """Every declared op (mmkernels/spec.py), then the whole-layer cases."""
    from mmkernels.bench.models import DecoderTrainCase, GenerateCase, MhaLayerCase, MllamaLayerCase
    from mmkernels.bench.varlen_attention import VarlenCase
    from mmkernels.spec import SPECS

    return [*SPECS, MllamaLayerCase.op, DecoderTrainCase.op, MhaLayerCase.op, GenerateCase.op, VarlenCase.op]


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--full", action="store_true", help="the long sweep, with every peer")
    parser.add_argument("--op", choices=op_choices(), help="only this op (or whole-layer case)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    parser.add_argument("--out", help="folder for the CSV and plots (default: a new temporary folder)")
    parser.add_argument("--save", action="store_true",
                        help=f"also merge the rows, case by case, into the checkout's results ({RESULTS})")
    parser.add_argument("--small", action="store_true",
                        help="only the small calls: per-call overhead, decoding steps and greedy generation")
    parser.add_argument("--load", action="store_true",
                        help="the attention cases again, with another process keeping one core busy (cpu)")


def parse_device(name: str | None) -> torch.device:
    """--device, checked: a clear message instead of a traceback deep in the first case."""
    from mmkernels.info import usable_device

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return usable_device(name, "--device")


def progress(cases):
    """(case, write) pairs: tqdm's bar when it is installed, else a plain line per case."""
    try:
        from tqdm import tqdm
    except ImportError:
        for i, case in enumerate(cases, 1):
            print(f"[{i}/{len(cases)}] {case.op} {case.mode} {case.shape}", flush=True)
            yield case, print
        return
    bar = tqdm(cases, desc="cases", unit="case")
    for case in bar:
        yield case, bar.write


def run(args) -> int:
    from mmkernels.bench import report, suites
    from mmkernels.bench.measure import busy_core, measured_peaks
    from mmkernels.bench.runner import run_case

    device = parse_device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.save and not os.path.isdir(RESULTS):
        fail(f"--save merges into a source checkout's benchmarks/results, and there is none at {RESULTS}; use --out")
    if args.small:
        cases = suites.small_call_cases()
    else:
        cases = (suites.cuda_cases if device.type == "cuda" else suites.cpu_cases)(args.full)
        if args.load:
            cases = [c for c in cases if c.op == "cross_attention"]
    cases = [c for c in cases if args.op in (None, c.op)]
    peaks = measured_peaks(device.type, str(dtype).removeprefix("torch."))
    print(f"mmkernels bench on {report.device_name(device)}, {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"measured peaks (% peak below is of these): matmul {peaks['TFLOP/s']:.3f} TFLOP/s, copy {peaks['GB/s']:.1f} GB/s")
    results = []
    with busy_core() if args.load else contextlib.nullcontext():
        if args.load:
            print("another process keeps one core busy for these runs")
        for case, write in progress(cases):
            case_results = run_case(case, device, dtype, args.full)
            write(report.format_case(case_results, dtype, peaks))
            results.append(case_results)
    out = args.out or tempfile.mkdtemp(prefix="mmkernels-bench-")
    os.makedirs(out, exist_ok=True)
    tag = f"{device.type}-{str(dtype).removeprefix('torch.')}{'-full' if args.full else ''}{'-load' if args.load else ''}"
    rows = [row for rs in results for row in report.csv_rows(rs, device, dtype, peaks)]
    written = [report.write_csv(os.path.join(out, f"{tag}.csv"), rows)]
    if args.save:
        written.append(report.merge_csv(os.path.join(RESULTS, f"{tag}.csv"), rows))
    for path in list(written):
        written += plots_for(path)
    for path in written:
        print(f"wrote {path}")
    return 0


def plots_for(csv_path) -> list[str]:
    try:
        from mmkernels.bench.plots import plot

        return plot(csv_path, os.path.dirname(csv_path))
    except ImportError:
        print("no plots: matplotlib is not installed (pip install 'mmkernels[bench]' for plots and a progress bar)")
        return []
