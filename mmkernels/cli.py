"""The `mmkernels` console command: `mmkernels info`, `mmkernels bench [...]`, `mmkernels profile [...]`."""
import argparse
import logging
import sys
import warnings

# Noise for these commands, not for the user: torch's notes about a missing CUDA runtime (not
# needed to run mmkernels on a CPU), as warnings and as log lines of cpp_extension (which
# torch.compile imports). The NumPy note is filtered where mmkernels imports torch.
QUIET = (r".*No CUDA runtime is found", r".*CUDA initialization")
QUIET_LOGGERS = ("torch.utils.cpp_extension",)


def version_text() -> str:
    import torch

    import mmkernels

    return (f"mmkernels {mmkernels.__version__} (built against torch {mmkernels._C.torch_version}, running torch "
            f"{torch.__version__}; compiled backends: {', '.join(mmkernels._C.compiled_backends)})")


def main(argv=None):
    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(prog="mmkernels", description="Fused kernels for multimodal models: facts, benchmarks, profiles.")
    parser.add_argument("--version", action="store_true", help="the version, and the torch it was built against")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="build facts and what is usable here")
    from mmkernels.bench import cli as bench_cli
    from mmkernels.profiling import cli as profile_cli

    bench_cli.add_arguments(sub.add_parser("bench", help="benchmark every backend against its peers"))
    profile_cli.add_arguments(sub.add_parser("profile", help="a whole model, stock against patched"))
    args = parser.parse_args(argv)
    if args.version:
        print(version_text())
        return 0
    if args.command is None:
        parser.error("a command is required: info, bench or profile (or --version)")
    from mmkernels.ops.checks import InvalidInput

    try:
        if args.command == "info":
            from mmkernels.info import format_info

            print(format_info())
            return 0
        return (bench_cli if args.command == "bench" else profile_cli).run(args)
    except InvalidInput as e:  # a bad argument: the message says which, no traceback
        print(f"mmkernels {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
