"""Verifiable rewards (``objective.reward_fn``: RLVR, objective mixing A = λ·A_OPD + (1−λ)·A_reward) and accuracy
verifiers (``accuracy.verifier``), and how to look one up by name: ``contains_answer`` (the last number, a regex),
``math`` (math-verify: ``\\boxed{}``, fractions, LaTeX), a task's verifier, or ``"module:function"``."""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Sequence

RewardFn = Callable[[Sequence[str], Sequence[str | None]], list[float]]  # = lockedopd.tasks.Verifier
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
MATH_TIMEOUT_S = 5  # per parse / comparison (math-verify's default), where a timeout can be set


def contains_answer(completions: Sequence[str], answers: Sequence[str | None]) -> list[float]:
    """1.0 when the last number in the completion equals the reference answer, else 0.0 (0.0 without answer)."""
    rewards = []
    for text, answer in zip(completions, answers):
        numbers = _NUMBER.findall(text)
        rewards.append(float(answer is not None and bool(numbers) and numbers[-1].strip() == str(answer).strip()))
    return rewards


def math_answer(completions: Sequence[str], answers: Sequence[str | None]) -> list[float]:
    """1.0 when math-verify finds the completion's answer (the last ``\\boxed{}``, else the last expression)
    mathematically equal to the reference (``1/2``, ``0.5`` and ``\\frac{1}{2}`` are one answer), else 0.0 (0.0
    without a reference). Needs the ``math-verify`` package (``pip install math-verify``)."""
    try:
        from math_verify import parse, verify
    except ImportError as exc:
        raise ImportError("reward_fn=math needs math-verify: pip install math-verify (or 'lockedopd[math]').") from exc
    # math-verify's timeouts use signal.alarm, which works only in the main thread: elsewhere none
    timeout = MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    rewards = []
    for text, answer in zip(completions, answers):
        if answer is None:
            rewards.append(0.0)
            continue
        gold, found = parse(str(answer), parsing_timeout=timeout), parse(text, parsing_timeout=timeout)
        rewards.append(float(bool(gold) and bool(found) and verify(gold, found, timeout_seconds=timeout)))
    return rewards


BUILTIN_REWARDS: dict[str, RewardFn] = {"contains_answer": contains_answer, "math": math_answer}


def resolve_reward_fn(spec: str) -> RewardFn:
    """A built-in reward name, a task's name (its verifier, :mod:`lockedopd.tasks`), ``"TASK.partial"`` (the task's
    partial-credit reward) or ``"module:function"``."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    from lockedopd.tasks.registry import get_task, task_names

    if spec in task_names():
        return get_task(spec).verify
    task, _, variant = spec.rpartition(".")
    if variant == "partial" and task in task_names():
        if get_task(task).partial_credit is None:
            raise ValueError(f"reward_fn {spec!r}: task {task!r} has no partial-credit reward; use {task!r}.")
        return get_task(task).partial_credit
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
