"""``lockedopd plan CONFIG``: the per-device memory of each phase of a config (:mod:`lockedopd.plan`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lockedopd.cli.command import add_command, add_config_arguments

__all__ = ["add_plan_parser"]


def add_plan_parser(subparsers) -> None:
    """Register ``lockedopd plan CONFIG [--world-size N] [--fsdp] [--json OUT] [key=value ...]``."""
    parser = add_command(
        subparsers,
        "plan",
        "per-device memory of each phase of a config, from the model's sizes alone (no weights loaded)",
        "Estimate per-device bytes of the warmup and locked phases (weights, gradients, optimizer state, bases, "
        "activations, logits, teacher) from the model configs; see lockedopd/plan.py for the model.",
        _run_plan,
    )
    add_config_arguments(parser)
    parser.add_argument("--world-size", type=int, default=1, help="devices the student trains on")
    parser.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer state (FSDP)")
    parser.add_argument("--json", dest="json_out", help="also write the plan as JSON to this file")


def _run_plan(args: argparse.Namespace) -> int:
    from lockedopd.opd import load_config
    from lockedopd.plan import format_plan, plan_memory

    plan = plan_memory(load_config(args.config, args.overrides), args.world_size, args.fsdp)
    print(format_plan(plan))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(plan, indent=2) + "\n")
    return 0
