"""``lockedopd task make``, ``lockedopd build-model`` and ``lockedopd eval``: make a task's data, build a model from a
recipe once (e.g. the task's SFT teacher), and measure a model's task accuracy."""

from __future__ import annotations

import json
from pathlib import Path

from lockedopd.cli.command import add_command, add_config_arguments

__all__ = ["add_task_parsers"]


def add_task_parsers(subparsers) -> None:
    """Register ``task``, ``build-model`` and ``eval``."""
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

    evaluate = add_command(
        subparsers,
        "eval",
        "task accuracy of a model: greedy exact match and mean accuracy over k samples",
        "Score a run's latest checkpoint or a model (directory, hub id, built:RECIPE, smollm2) on problems with "
        "answers: greedy exact match and the mean accuracy of --samples samples per problem at --temperature; JSON "
        "to stdout or --json.",
        _run_eval,
    )
    evaluate.add_argument(
        "model",
        help="a run directory (its latest checkpoint), a model directory, a hub id, built:RECIPE.yaml or smollm2",
    )
    evaluate.add_argument("--data", required=True, help="problems with an answer each: JSONL, parquet, a datasets dir")
    evaluate.add_argument("--verifier", required=True, help="a task name, contains_answer or module:function")
    evaluate.add_argument("--size", type=int, default=None, help="score only the first N problems")
    evaluate.add_argument("--samples", type=int, default=4, help="samples per problem (0 = greedy only)")
    evaluate.add_argument("--temperature", type=float, default=1.0)
    evaluate.add_argument("--max-new-tokens", type=int, default=64)
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument(
        "--drop-every", type=int, default=None, help="evaluate the model with every n-th layer removed"
    )
    evaluate.add_argument(
        "--keep-layers", default=None, help="evaluate the model with only these decoder layers (comma list of indices)"
    )
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--json", dest="json_out", type=Path, help="also write the result here")
    evaluate.add_argument("--markdown", dest="markdown_out", type=Path, help="also write it as a markdown table here")


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


def _run_eval(args) -> int:
    from lockedopd.data import load_records
    from lockedopd.opd.accuracy import evaluate_accuracy
    from lockedopd.opd.builders import build_model
    from lockedopd.opd.config import ModelConfig
    from lockedopd.opd.rollout import encode_prompts
    from lockedopd.tasks.rewards import resolve_reward_fn

    verifier = resolve_reward_fn(args.verifier)
    problems = [r for r in load_records(args.data) if r.answer is not None][: args.size]
    if not problems:
        raise ValueError(f'{args.data} has no record with an "answer"; accuracy needs reference answers.')
    keep = [int(i) for i in args.keep_layers.split(",")] if args.keep_layers else None
    step = None
    if (Path(args.model) / "config.yaml").is_file():  # a run directory: its latest checkpoint, update folded in
        from lockedopd.opd.run_checkpoint import load_run_model

        model, tokenizer, step = load_run_model(args.model)
    else:
        model, tokenizer = build_model(ModelConfig(source=args.model, drop_every=args.drop_every, keep_layers=keep))
    prompt_ids = encode_prompts(tokenizer, [r.prompt for r in problems])
    result = evaluate_accuracy(
        model, tokenizer, prompt_ids, [r.answer for r in problems], verifier, args.max_new_tokens,
        batch_size=args.batch_size, samples=args.samples, temperature=args.temperature, seed=args.seed,
    )  # fmt: skip
    report = {
        "model": args.model,
        "checkpoint_step": step,
        "drop_every": args.drop_every,
        "keep_layers": keep,
        "data": str(args.data),
        "verifier": args.verifier,
        "greedy_accuracy": result.greedy,
        "sampled_accuracy": result.sampled,
        "samples": result.samples,
        "temperature": args.temperature,
        "problems": result.problems,
        "mean_completion_tokens": result.mean_completion_tokens,
        "seed": args.seed,
    }
    text = json.dumps(report, indent=2)
    from lockedopd.runtime.atomic_io import atomic_write_text

    if args.json_out:
        atomic_write_text(args.json_out, text + "\n")
    if args.markdown_out:
        atomic_write_text(args.markdown_out, eval_markdown(report))
    print(text)
    return 0


def eval_markdown(report: dict) -> str:
    """One ``lockedopd eval`` result as a markdown table (model, data, problems, greedy and mean@k accuracy)."""
    from lockedopd.bench.tables import markdown_table

    sampled = "—" if report["sampled_accuracy"] is None else f"{report['sampled_accuracy']:.3f}"
    row = [report["model"], report["data"], report["verifier"], report["problems"],
           f"{report['greedy_accuracy']:.3f}", f"mean@{report['samples']}: {sampled}"]  # fmt: skip
    head = ["model", "data", "verifier", "problems", "greedy", "sampled"]
    return "\n".join(markdown_table(head, [row], numbers_right=True)) + "\n"
