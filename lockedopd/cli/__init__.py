"""``lockedopd`` command line: ``distill``, ``diagnose``, ``trajectory``, ``bench``, ``plan``, ``task``,
``build-model``, ``eval``: one module a command family, registered through :mod:`lockedopd.cli.command`, every
failure reported by :mod:`lockedopd.cli.errors`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from lockedopd.cli.bench import add_bench_parser
from lockedopd.cli.command import add_command, add_config_arguments
from lockedopd.cli.diagnostics import add_diagnose_parser, add_trajectory_parser
from lockedopd.cli.errors import run_guarded
from lockedopd.cli.evaluate import add_eval_parser
from lockedopd.cli.plan import add_plan_parser
from lockedopd.cli.tasks import add_task_parsers
from lockedopd.runtime.vllm_runtime import set_verbose

VERBOSE_HELP = "log at INFO level and show vLLM's start-up log (or set LOCKEDOPD_VERBOSE=1)"
DEBUG_HELP = "print the traceback of an error, not only its one-line message (or set LOCKEDOPD_DEBUG=1)"


def _add_distill_parser(subparsers) -> None:
    parser = add_command(
        subparsers,
        "distill",
        "run on-policy distillation from a YAML config",
        "Run OPD (with optional warmup → subspace lock) from a YAML config. Overrides are key=value with dotted "
        "keys, e.g. max_steps=2 output_dir=runs/x resume=true lock.rank=8.",
        _run_distill,
    )
    add_config_arguments(parser)
    # SUPPRESS: without the flag here, `lockedopd -v distill ...` keeps the top-level value
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


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


#: Who registers the subcommands, in ``lockedopd --help`` order.
COMMAND_FAMILIES = (
    _add_distill_parser,
    add_bench_parser,
    add_diagnose_parser,
    add_trajectory_parser,
    add_task_parsers,
    add_eval_parser,
    add_plan_parser,
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level argument parser."""
    parser = argparse.ArgumentParser(
        prog="lockedopd", description="On-policy distillation that trains inside the locked update subspace."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parsers in COMMAND_FAMILIES:
        add_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point. Every error prints one line (two with a note) to stderr and exits with status 2; ``--debug``
    adds the traceback (:mod:`lockedopd.cli.errors`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        set_verbose(True)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return run_guarded(args.command, args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
