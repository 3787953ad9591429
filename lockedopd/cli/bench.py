"""``lockedopd bench``: the benchmarks of :mod:`lockedopd.bench`, run from the package."""

from __future__ import annotations

import argparse

from lockedopd.cli.command import add_command

__all__ = ["add_bench_parser"]


def add_bench_parser(subparsers) -> None:
    """Register ``lockedopd bench [quality] EXPERIMENT.yaml [...]``."""
    parser = add_command(
        subparsers,
        "bench",
        "benchmarks: (bench quality) the methods' quality over seeds, or their memory/speed side by side",
        "`lockedopd bench quality EXPERIMENT.yaml [...]` runs the resumable method x seed quality grid "
        "(lockedopd.bench.quality; e.g. `lockedopd bench quality benchmarks/experiments/quality_smollm2.yaml`, "
        "`... --rerender`, `... --pack`). `lockedopd bench EXPERIMENT.yaml [...]` compares the methods' memory and "
        "speed side by side (lockedopd.bench.memory; e.g. `lockedopd bench benchmarks/experiments/smollm2.yaml "
        "--out runs/bench`).",
        _run_bench,
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help="[quality] and the arguments of the benchmark")


def _run_bench(args: argparse.Namespace) -> int:
    if args.args[:1] == ["quality"]:
        from lockedopd.bench.quality import main as benchmark_main

        argv = args.args[1:]
    else:
        from lockedopd.bench.memory import main as benchmark_main

        argv = args.args
    try:
        return int(benchmark_main(argv) or 0)
    except SystemExit as exc:  # argparse's --help and usage errors
        return int(exc.code or 0)
