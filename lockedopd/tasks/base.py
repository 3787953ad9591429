"""What a verifiable task is: a seeded problem generator, disjoint splits by problem identity, and a verifier."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lockedopd.runtime.atomic_io import atomic_write_text

#: A verifier (and verifiable reward): completions and their reference answers -> one score in [0, 1] each.
Verifier = Callable[[Sequence[str], Sequence[str | None]], list[float]]
SPLITS = ("train", "validation", "test")
#: Share of the problem space (in hundredths, by hash bucket) each split owns; the buckets never overlap.
SPLIT_BUCKETS = {"test": range(0, 10), "validation": range(10, 20), "train": range(20, 100)}


@dataclass(frozen=True)
class TaskProblem:
    """One problem: the prompt, a worked solution that ends with the answer, and the reference answer."""

    prompt: str
    completion: str
    answer: str

    def as_record(self, task: str) -> dict[str, str]:
        """The JSONL record the prompt loader reads (``prompt``, ``completion``, ``answer``, ``source``)."""
        return {"prompt": self.prompt, "completion": self.completion, "answer": self.answer, "source": task}


@dataclass(frozen=True)
class Task:
    """A procedural task.

    Attributes:
        name: the task's name (``lockedopd task make NAME``, ``objective.reward_fn: NAME``).
        draw: draws one problem key (hashable, e.g. the operands) from a ``random.Random``.
        render: the :class:`TaskProblem` of a key.
        verify: the :data:`Verifier`: 1.0 where a completion's answer equals the reference, else 0.0 (also a
            reward function: ``objective.reward_fn: NAME``).
        description: one line for ``--help`` and reports.
        partial_credit: a dense reward in [0, 1] that equals 1.0 exactly where ``verify`` accepts
            (``objective.reward_fn: NAME.partial``): RLVR from a student that almost never gets the whole answer
            right learns nothing from 0/1 rewards; ``None`` when the task has none.
        variant_of: the task whose problems this one shares, split for split and seed for seed, written with
            another solution style (``None``: its own problems). Its test problems are then exactly the other
            task's, and no train problem of either is a test problem of the other.
    """

    name: str
    draw: Callable[[random.Random], Hashable]
    render: Callable[[Hashable], TaskProblem]
    verify: Verifier
    description: str = ""
    partial_credit: Verifier | None = None
    variant_of: str | None = None

    @property
    def problem_space(self) -> str:
        """The name the problems' splits and draws are keyed by: :attr:`variant_of`, else :attr:`name`."""
        return self.variant_of or self.name

    def split_of(self, key: Hashable) -> str:
        """The split a problem belongs to, a pure function of the problem: splits never share a problem, whatever
        the seed or the number of problems drawn."""
        digest = hashlib.sha256(f"{self.problem_space}:{key!r}".encode()).digest()
        bucket = int.from_bytes(digest[:8], "big") % 100
        return next(split for split, buckets in SPLIT_BUCKETS.items() if bucket in buckets)

    def problems(self, split: str, count: int, seed: int = 0) -> list[TaskProblem]:
        """``count`` distinct problems of ``split``, deterministic under ``seed``."""
        if split not in SPLITS:
            raise ValueError(f"task {self.name}: split {split!r} is not one of {list(SPLITS)}.")
        if count < 1:
            raise ValueError(f"task {self.name}: count must be >= 1, got {count}.")
        rng = random.Random(f"{self.problem_space}/{split}/{seed}")
        seen: set[Hashable] = set()
        keys: list[Hashable] = []
        attempts = 0
        while len(keys) < count:
            attempts += 1
            if attempts > 200 * count + 10_000:
                raise ValueError(
                    f"task {self.name}: found only {len(keys)} distinct {split} problems of the {count} asked for; "
                    "the problem space is too small for that many: ask for fewer."
                )
            key = self.draw(rng)
            if key in seen or self.split_of(key) != split:
                continue
            seen.add(key)
            keys.append(key)
        return [self.render(key) for key in keys]


def write_task_splits(task: Task, out: str | Path, sizes: dict[str, int], seed: int = 0) -> dict[str, Path]:
    """Write ``{split}.jsonl`` files (``prompt``, ``completion``, ``answer``) for each split in ``sizes``, atomically;
    returns the paths. Refuses unknown splits before anything is written."""
    unknown = sorted(set(sizes) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; the splits are {list(SPLITS)}.")
    out = Path(out)
    made = {split: task.problems(split, count, seed) for split, count in sizes.items()}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, problems in made.items():
        lines = "".join(json.dumps(p.as_record(task.name)) + "\n" for p in problems)
        paths[split] = out / f"{split}.jsonl"
        atomic_write_text(paths[split], lines)
    return paths
