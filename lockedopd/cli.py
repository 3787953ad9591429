"""``lockedopd`` command line: ``distill``, ``diagnose``, ``trajectory``, ``bench``, ``plan``, ``task``,
``build-model``, ``eval``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from lockedopd.cli_errors import run_guarded
from lockedopd.runtime.vllm_runtime import set_verbose

VERBOSE_HELP = "log at INFO level and show vLLM's start-up log (or set LOCKEDOPD_VERBOSE=1)"
DEBUG_HELP = "print the traceback of an error, not only its one-line message (or set LOCKEDOPD_DEBUG=1)"


def _add_distill_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="run on-policy distillation from a YAML config",
        description="Run OPD (with optional warmup → subspace lock) from a YAML config. Overrides are key=value "
        "with dotted keys, e.g. max_steps=2 output_dir=runs/x resume=true lock.rank=8.",
    )
    parser.add_argument("config", help="YAML config (see recipes/configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    # SUPPRESS: without the flag here, `lockedopd -v distill ...` keeps the top-level value
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    parser.set_defaults(handler=_run_distill)


def _run_distill(args) -> int:
    from lockedopd.opd import OPDTrainer, load_config
    from lockedopd.runtime.distributed import shutdown_distributed

    config = load_config(args.config, args.overrides)
    trainer = OPDTrainer.from_config(config)
    summary = trainer.train()
    shutdown_distributed()  # with several processes: close the group they trained in
    if not trainer.dist.is_main:  # one report per run, not one per process
        return 0
    print(json.dumps(summary, indent=2))
    before, after = summary.get("initial_reverse_kl"), summary.get("final_reverse_kl")
    if before is not None and after is not None:
        print(f"held-out reverse KL: {before:.4f} -> {after:.4f} nats/token")
    print(f"results in {summary['output_dir']} (metrics.jsonl, curves.png, summary.json, checkpoints/)")
    return 0


def _add_bench_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmarks: (bench quality) the methods' quality over seeds, or their memory/speed side by side",
        description="`lockedopd bench quality EXPERIMENT.yaml [...]` runs the resumable method x seed quality grid "
        "(lockedopd.bench.quality; e.g. `lockedopd bench quality benchmarks/experiments/quality_smollm2.yaml`, "
        "`... --rerender`, `... --pack`). `lockedopd bench EXPERIMENT.yaml [...]` compares the methods' memory and "
        "speed side by side (lockedopd.bench.memory; e.g. `lockedopd bench benchmarks/experiments/smollm2.yaml "
        "--out runs/bench`).",
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help="[quality] and the arguments of the benchmark")
    parser.set_defaults(handler=_run_bench)


def _run_bench(args) -> int:
    if args.args[:1] == ["quality"]:
        from lockedopd.bench.quality import main as quality_main

        try:
            return int(quality_main(args.args[1:]) or 0)
        except SystemExit as exc:  # argparse's --help and usage errors
            return int(exc.code or 0)
    from lockedopd.bench.memory import main as memory_main

    try:
        return int(memory_main(args.args) or 0)
    except SystemExit as exc:
        return int(exc.code or 0)


def _add_subsystem_parsers(subparsers) -> None:
    """Subcommands that live with their subsystems (diagnostics, tasks, memory plans); each sets ``handler``."""
    from lockedopd.diagnostics.cli import add_diagnose_parser, add_trajectory_parser

    add_diagnose_parser(subparsers)
    add_trajectory_parser(subparsers)
    from lockedopd.tasks.cli import add_task_parsers

    add_task_parsers(subparsers)
    from lockedopd.plan import add_plan_parser

    add_plan_parser(subparsers)


def build_parser() -> argparse.ArgumentParser:
    """The top-level argument parser."""
    parser = argparse.ArgumentParser(prog="lockedopd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_distill_parser(subparsers)
    _add_bench_parser(subparsers)
    _add_subsystem_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point. Every error prints one line (two with a note) to stderr and exits with status 2; ``--debug``
    adds the traceback (:mod:`lockedopd.cli_errors`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        set_verbose(True)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return run_guarded(args.command, args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
