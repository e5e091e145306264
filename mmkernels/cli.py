"""The `mmkernels` console command: `mmkernels info`, `mmkernels bench [...]`."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mmkernels")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="build facts and what is usable here")
    bench = sub.add_parser("bench", help="benchmark every backend against its peers")
    from mmkernels.bench.cli import add_arguments

    add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "info":
        from mmkernels.info import format_info

        print(format_info())
        return 0
    from mmkernels.bench.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
