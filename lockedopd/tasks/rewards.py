"""Verifiable rewards for objective mixing (A = λ·A_OPD + (1−λ)·A_reward), and how to look one up by name."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence

RewardFn = Callable[[Sequence[str], Sequence[str | None]], list[float]]  # = lockedopd.tasks.Verifier
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def contains_answer(completions: Sequence[str], answers: Sequence[str | None]) -> list[float]:
    """1.0 when the last number in the completion equals the reference answer, else 0.0 (0.0 without answer)."""
    rewards = []
    for text, answer in zip(completions, answers):
        numbers = _NUMBER.findall(text)
        rewards.append(float(answer is not None and bool(numbers) and numbers[-1].strip() == str(answer).strip()))
    return rewards


BUILTIN_REWARDS: dict[str, RewardFn] = {"contains_answer": contains_answer}


def resolve_reward_fn(spec: str) -> RewardFn:
    """A built-in reward name, a task's name (its verifier, :mod:`lockedopd.tasks`) or ``"module:function"``."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    from lockedopd.tasks.registry import get_task, task_names

    if spec in task_names():
        return get_task(spec).verify
    if ":" not in spec:
        raise ValueError(
            f"reward_fn {spec!r} is neither a built-in ({sorted(BUILTIN_REWARDS)}), a task's verifier "
            f"({task_names()}) nor 'module:function'."
        )
    module_name, func_name = spec.split(":", 1)
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward_fn {spec!r} cannot be imported: {exc}") from exc
    if not callable(func):
        raise ValueError(f"reward_fn {spec!r} is not callable.")
    return func
