"""The teacher's task accuracy of a grid: measured once with the cells' accuracy settings, cached in
``OUT/teacher_accuracy.json``."""

from __future__ import annotations

import json
import time
from typing import Any

from lockedopd.bench.experiment import REFERENCE, Experiment, cell_config, in_root


def read_teacher_accuracy(exp: Experiment) -> dict[str, Any] | None:
    """The teacher's accuracy (``OUT/teacher_accuracy.json``), or None before it was measured."""
    path = exp.out_dir / "teacher_accuracy.json"
    return json.loads(path.read_text()) if path.is_file() else None


def measure_teacher_accuracy(exp: Experiment) -> dict[str, Any] | None:
    """Score ``exp.teacher_model`` once with the cells' accuracy settings (problems, samples, seed of seed 0's cells)
    and cache it in ``OUT/teacher_accuracy.json``."""
    if not (exp.task and exp.teacher_model):
        return None
    cached = read_teacher_accuracy(exp)
    if cached is not None:
        return cached
    from lockedopd.opd.accuracy import evaluate_accuracy
    from lockedopd.opd.builders import build_accuracy_problems, build_model
    from lockedopd.opd.config import ModelConfig
    from lockedopd.opd.rollout import encode_prompts
    from lockedopd.opd.seeds import ACCURACY_SEED_OFFSET, step_seed
    from lockedopd.runtime.checkpoint import atomic_write_text
    from lockedopd.tasks.rewards import resolve_reward_fn

    config = cell_config(exp, REFERENCE if REFERENCE in exp.methods else next(iter(exp.methods)), exp.seeds[0])
    acc = config.accuracy
    if exp.threads:  # as a cell runs: on shared cores a second thread stalls at every OpenMP barrier
        import torch

        torch.set_num_threads(exp.threads)
    with in_root(exp):  # the recipe's data paths and a built:RECIPE teacher are read from the experiment's root
        problems = build_accuracy_problems(config)
        model, tokenizer = build_model(ModelConfig(source=exp.teacher_model))
    ids = encode_prompts(tokenizer, [p.prompt for p in problems], config.data.use_chat_template,
                         config.rollout.max_prompt_tokens)  # fmt: skip
    started = time.time()
    result = evaluate_accuracy(
        model, tokenizer, ids, [p.answer for p in problems], resolve_reward_fn(acc.verifier),
        acc.max_new_tokens or config.rollout.max_new_tokens, batch_size=acc.batch_size, samples=acc.samples,
        temperature=acc.temperature, seed=step_seed(config.seed + ACCURACY_SEED_OFFSET, 0),
    )  # fmt: skip
    record = {
        "model": exp.teacher_model,
        "greedy_accuracy": result.greedy,
        "sampled_accuracy": result.sampled,
        "samples": result.samples,
        "problems": result.problems,
        "seconds": round(time.time() - started, 1),
    }
    exp.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(exp.out_dir / "teacher_accuracy.json", json.dumps(record, indent=2))
    return record
