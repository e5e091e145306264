"""`mmkernels bench`: the curated sweep for the device it finds, a table, a CSV and plots."""
import argparse
import contextlib
import os

import torch


def op_choices() -> list[str]:
    """Every declared op (mmkernels/spec.py), then the whole-layer cases."""
    from mmkernels.bench.models import DecoderTrainCase, MllamaLayerCase
    from mmkernels.spec import SPECS

    return [*SPECS, MllamaLayerCase.op, DecoderTrainCase.op]


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--full", action="store_true", help="the long sweep, with every peer")
    parser.add_argument("--op", choices=op_choices(), help="only this op (or whole-layer case)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the CSV and plots")
    parser.add_argument("--load", action="store_true",
                        help="the attention cases again, with another process keeping one core busy (cpu)")


def run(args) -> int:
    from tqdm import tqdm

    from mmkernels.bench import report, suites
    from mmkernels.bench.runner import run_case

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    cases = (suites.cuda_cases if device.type == "cuda" else suites.cpu_cases)(args.full)
    cases = [c for c in cases if args.op in (None, c.op)]
    if args.load:
        cases = [c for c in cases if c.op == "cross_attention"]
    from mmkernels.bench.measure import measured_peaks

    peaks = measured_peaks(device.type, str(dtype).removeprefix("torch."))
    print(f"mmkernels bench on {report.device_name(device)}, {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"measured peaks (% peak below is of these): matmul {peaks['TFLOP/s']:.3f} TFLOP/s, copy {peaks['GB/s']:.1f} GB/s")
    results = []
    from mmkernels.bench.measure import busy_core

    with busy_core() if args.load else contextlib.nullcontext():
        if args.load:
            print("another process keeps one core busy for these runs")
        for case in tqdm(cases, desc="cases", unit="case"):
            case_results = run_case(case, device, dtype, args.full)
            tqdm.write(report.format_case(case_results, dtype, peaks))
            results.append(case_results)
    os.makedirs(args.out, exist_ok=True)
    tag = f"{device.type}-{str(dtype).removeprefix('torch.')}{'-full' if args.full else ''}{'-load' if args.load else ''}"
    path = os.path.join(args.out, f"{tag}.csv")
    report.write_csv(path, [row for rs in results for row in report.csv_rows(rs, device, dtype, peaks)])
    from mmkernels.bench.plots import plot

    for written in [path, *plot(path, args.out)]:
        print(f"wrote {written}")
    return 0
