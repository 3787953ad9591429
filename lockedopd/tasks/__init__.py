"""Verifiable tasks: seeded generators with disjoint train / validation / test splits and a verifier.

A task's verifier has the reward-function signature of :mod:`lockedopd.tasks.rewards` (completions, reference answers →
one score in [0, 1] each), so the same function serves as ``objective.reward_fn`` and as the accuracy evaluator's
judge (:mod:`lockedopd.opd.accuracy`).
"""

from lockedopd.tasks.base import SPLITS, Task, TaskProblem, Verifier, write_task_splits
from lockedopd.tasks.column_addition import COLUMN_ADDITION, COLUMN_ADDITION_VERBOSE
from lockedopd.tasks.registry import get_task, register_task, task_names

__all__ = [
    "COLUMN_ADDITION",
    "COLUMN_ADDITION_VERBOSE",
    "SPLITS",
    "Task",
    "TaskProblem",
    "Verifier",
    "get_task",
    "register_task",
    "task_names",
    "write_task_splits",
]
