"""The registered tasks, by name."""

from __future__ import annotations

from lockedopd.tasks.base import Task
from lockedopd.tasks.column_addition import COLUMN_ADDITION, COLUMN_ADDITION_VERBOSE

_TASKS: dict[str, Task] = {task.name: task for task in (COLUMN_ADDITION, COLUMN_ADDITION_VERBOSE)}


def register_task(task: Task) -> Task:
    """Make ``task`` available by name (:func:`get_task`, ``objective.reward_fn``, ``accuracy.verifier``)."""
    if task.name in _TASKS and _TASKS[task.name] is not task:
        raise ValueError(f"a task named {task.name!r} is already registered.")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task ``name``; a ``ValueError`` naming the registered ones otherwise."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(_TASKS)}.")
    return _TASKS[name]


def task_names() -> list[str]:
    """Names of the registered tasks."""
    return sorted(_TASKS)
