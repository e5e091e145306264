"""`mmkernels profile`: a recipe (or all of them), stock against mmkernels, as a table."""
import argparse
import csv
import os
import sys

import torch

from mmkernels.info import usable_device
from mmkernels.profiling import recipes
from mmkernels.profiling.report import CSV_FIELDS


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--recipe", default="all", choices=[*recipes.RECIPES, "all"], help="which model (default: all)")
    parser.add_argument("--size", default="tiny", choices=recipes.SIZES,
                        help="tiny: seconds, for CI; real: the real layer sizes (default: tiny)")
    parser.add_argument("--no-backward", action="store_true", help="forward only (no forward+backward)")
    parser.add_argument("--trace", metavar="PATH",
                        help="write a Chrome trace; with --recipe all, one per recipe, named PATH with the recipe inserted")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="default: float32")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each side first (default: 1)")
    parser.add_argument("--iters", type=int, default=3, help="timed calls of each side; the median is reported (default: 3)")
    parser.add_argument("--csv", metavar="PATH", help="also write the numbers as CSV (one row per recipe and mode)")


def _trace_path(path, recipe, several):
    if not path or not several:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}.{recipe}{ext or '.json'}"


def run(args) -> int:
    """0 when every recipe's two models agree, 1 when one does not, 2 for arguments that can't run here."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # kineto's own log lines would land inside the tables
    from mmkernels.profiling.core import profile

    names = list(recipes.RECIPES) if args.recipe == "all" else [args.recipe]
    try:
        usable_device(args.device, "--device")
    except ValueError as e:
        print(f"mmkernels profile: {e}", file=sys.stderr)
        return 2
    for flag, value, least in (("--warmup", args.warmup, 1), ("--iters", args.iters, 1)):
        if value < least:
            print(f"mmkernels profile: {flag} must be at least {least}, got {value}", file=sys.stderr)
            return 2
    print(f"mmkernels profile, torch {torch.__version__}, {torch.get_num_threads()} threads, size {args.size}")
    rows, status = [], 0
    for name in names:
        try:
            recipe = recipes.build(name, args.size, args.device, getattr(torch, args.dtype))
        except (ValueError, ImportError) as e:
            print(f"mmkernels profile: {name}: {e}", file=sys.stderr)
            return 2
        result = profile(recipe.model, recipe.inputs, backward=not args.no_backward, warmup=args.warmup, iters=args.iters,
                         trace=_trace_path(args.trace, name, len(names) > 1), label=recipe.title)
        result.notes += recipe.notes
        print()
        print(result, flush=True)
        rows += result.csv_rows(name, args.size)
        status = status or (0 if result.agree else 1)
        del recipe, result  # the next recipe's models should not have to share memory with these
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"\nwrote {args.csv}")
    return status


def main(argv=None) -> int:
    """`python -m mmkernels.profiling.cli`, until `mmkernels profile` calls run()."""
    parser = argparse.ArgumentParser(prog="mmkernels profile", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
