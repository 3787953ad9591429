"""Prompt sets: JSONL files with a ``"prompt"`` field (``"answer"`` and ``"completion"`` optional), or synthetic
prompts for tiny runs."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PromptRecord:
    """One prompt, with the reference answer when the data has one (verifiable rewards, accuracy) and a given
    completion when it has one (what ``objective.name: sft`` trains on)."""

    prompt: str
    answer: str | None = None
    completion: str | None = None


def load_prompts(path: str | Path) -> list[PromptRecord]:
    """Read a JSONL prompt file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not UTF-8 text, a line is not JSON or lacks a non-empty ``"prompt"``, or the file
            holds no prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {path} does not exist; generate the shipped set with `python recipes/data/make_prompts.py`"
            ' or point data.train_path at a JSONL file with one {"prompt": ...} per line.'
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"prompt file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); give a JSONL file with one "
            '{"prompt": ...} per line.'
        ) from exc
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number} is not valid JSON ({exc.msg}).") from exc
        prompt = item.get("prompt") if isinstance(item, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f'{path}:{number} has no non-empty "prompt" string.')
        answer, completion = item.get("answer"), item.get("completion")
        if completion is not None and not isinstance(completion, str):
            raise ValueError(f'{path}:{number} has a "completion" that is not a string.')
        records.append(PromptRecord(prompt, None if answer is None else str(answer), completion))
    if not records:
        raise ValueError(f"prompt file {path} holds no prompts; OPD needs at least one.")
    return records


def synthetic_prompts(n: int, seed: int = 0) -> list[PromptRecord]:
    """Small arithmetic prompts made from a seed, for tiny-model runs and tests (no files needed)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        op = rng.choice("+-")
        records.append(PromptRecord(f"{a}{op}{b}=", str(a + b if op == "+" else a - b)))
    return records


def split_prompts(records: list[PromptRecord], eval_size: int, seed: int = 0):
    """Hold out ``eval_size`` prompts (a seeded shuffle); returns ``(train, eval)``."""
    if eval_size < 0 or eval_size >= len(records):
        raise ValueError(
            f"cannot hold out {eval_size} of {len(records)} prompts; lower data.eval_size or give data.eval_path."
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:eval_size])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in order[:eval_size]]
