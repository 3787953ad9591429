"""``lockedopd task make`` and ``lockedopd build-model``: make a task's data and build a model from a recipe once
(e.g. the task's SFT teacher)."""

from __future__ import annotations

import json
from pathlib import Path

from lockedopd.cli.command import add_command, add_config_arguments

__all__ = ["add_task_parsers"]


def add_task_parsers(subparsers) -> None:
    """Register ``task`` and ``build-model``."""
    task = subparsers.add_parser("task", help="verifiable tasks: write a task's train/validation/test splits")
    actions = task.add_subparsers(dest="task_command", required=True)
    make = add_command(
        actions,
        "make",
        "write NAME's splits as JSONL (prompt, completion, answer)",
        "Write {train,validation,test}.jsonl of a registered task; the splits never share a problem and the files "
        "are the same for the same --seed.",
        _run_task_make,
    )
    make.add_argument("name", help="the task (e.g. column_addition)")
    make.add_argument("--out", required=True, type=Path, help="directory for the JSONL files")
    make.add_argument("--train", type=int, default=8000, help="training problems")
    make.add_argument("--validation", type=int, default=500, help="validation problems (choose settings on these)")
    make.add_argument("--test", type=int, default=1000, help="test problems (report these)")
    make.add_argument("--seed", type=int, default=0)

    build = add_command(
        subparsers,
        "build-model",
        "train a recipe once and cache its final model (e.g. a task's SFT teacher): `source: built:RECIPE`",
        "Train RECIPE (a distill config with lock.enabled=false) unless its model is cached, and print the "
        "directory. The cache key is a hash of the recipe's training settings and data (overrides change it); a "
        "killed build resumes when run again.",
        _run_build_model,
    )
    add_config_arguments(build, "YAML recipe (e.g. recipes/configs/teacher_column_addition.yaml)")


def _run_task_make(args) -> int:
    from lockedopd.tasks.base import write_task_splits
    from lockedopd.tasks.registry import get_task

    task = get_task(args.name)
    sizes = {"train": args.train, "validation": args.validation, "test": args.test}
    paths = write_task_splits(task, args.out, sizes, seed=args.seed)
    for split, path in paths.items():
        print(f"{split}: {sizes[split]} problems -> {path}")
    return 0


def _run_build_model(args) -> int:
    from lockedopd.opd.build import build_model_from_recipe

    directory, record = build_model_from_recipe(args.config, args.overrides)
    print(json.dumps(record.get("final_evaluation", {}), indent=2))
    print(f"built model: {directory}")
    return 0
