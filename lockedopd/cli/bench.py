"""``lockedopd bench``: the benchmarks of :mod:`lockedopd.bench`, run from the package."""

from __future__ import annotations

import argparse

from lockedopd.cli.command import add_command

__all__ = ["PAPER_EXPERIMENT", "add_bench_parser"]

#: What ``lockedopd bench paper`` runs when no experiment is named.
PAPER_EXPERIMENT = "benchmarks/experiments/paper_column_addition.yaml"


def add_bench_parser(subparsers) -> None:
    """Register ``lockedopd bench [quality|paper] EXPERIMENT.yaml [...]``."""
    parser = add_command(
        subparsers,
        "bench",
        "benchmarks: (bench quality) the methods' quality over seeds, or their memory/speed side by side",
        "`lockedopd bench quality EXPERIMENT.yaml [...]` runs the resumable method x seed quality grid "
        "(lockedopd.bench.quality; e.g. `lockedopd bench quality benchmarks/experiments/quality_smollm2.yaml`, "
        "`... --rerender`, `... --pack`). `lockedopd bench paper [EXPERIMENT.yaml] [...]` runs the paper's findings "
        f"(an experiment with report: paper; default {PAPER_EXPERIMENT}) through the same harness. "
        "`lockedopd bench EXPERIMENT.yaml [...]` compares the methods' memory and "
        "speed side by side (lockedopd.bench.memory; e.g. `lockedopd bench benchmarks/experiments/smollm2.yaml "
        "--out runs/bench`).",
        _run_bench,
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help="[quality|paper] and the arguments of the benchmark")


def _run_bench(args: argparse.Namespace) -> int:
    if args.args[:1] == ["paper"]:
        from lockedopd.bench.experiment import load_experiment
        from lockedopd.bench.quality import main as benchmark_main

        argv = args.args[1:]
        if not argv or argv[0].startswith("-"):
            argv = [PAPER_EXPERIMENT, *argv]
        if argv[0] not in ("-h", "--help") and load_experiment(argv[0]).report != "paper":
            raise ValueError(
                f"{argv[0]} is not a paper experiment (it has no `report: paper`); run it with `lockedopd bench "
                f"quality {argv[0]}`, or give a paper experiment (e.g. {PAPER_EXPERIMENT})."
            )
    elif args.args[:1] == ["quality"]:
        from lockedopd.bench.quality import main as benchmark_main

        argv = args.args[1:]
    else:
        from lockedopd.bench.memory import main as benchmark_main

        argv = args.args
    try:
        return int(benchmark_main(argv) or 0)
    except SystemExit as exc:  # argparse's --help and usage errors
        return int(exc.code or 0)
