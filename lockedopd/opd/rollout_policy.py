"""Who samples a run's rollouts (``rollout.policy``) and how many per prompt (``rollout.samples_per_prompt``).

On-policy OPD samples the student as it trains. Off-policy OPD scores the same per-token advantage
log π_T(y) − log π_S(y) on sequences another policy wrote: the teacher's (``teacher``) or the student's as the run
began (``initial_student``, a frozen copy made before the first step). Several samples of one prompt form a group,
whose mean reward is each sample's baseline (``rlvr``, and the reward part of ``pg`` with ``reward_lambda < 1``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lockedopd.opd.rollout import HFStudentSampler, StudentSampler

__all__ = ["RolloutPolicy"]


class RolloutPolicy:
    """The sampling side of a run.

    Args:
        config: the run's :class:`lockedopd.OPDConfig` (its ``rollout`` section).
        student: the student as the run starts (copied for ``initial_student``).
        teacher: the run's teacher scorer; ``teacher`` sampling needs its in-process model (``teacher.backend: hf``).
    """

    def __init__(self, config: Any, student: nn.Module, teacher: Any) -> None:
        rollout = config.rollout
        self.name = rollout.policy
        self.samples_per_prompt = rollout.samples_per_prompt
        self.seed_per_row = rollout.seeding == "prompt"
        self.behaviour: nn.Module | None = None  # the off-policy model, None when the student samples
        if self.name == "initial_student":
            self.behaviour = copy.deepcopy(student).requires_grad_(False)
        elif self.name == "teacher":
            model = getattr(teacher, "model", None)
            if not isinstance(model, nn.Module) or not hasattr(model, "generate"):
                raise ValueError(
                    f"rollout.policy=teacher samples with the teacher's in-process model, which "
                    f"{type(teacher).__name__} does not hold; set teacher.backend=hf."
                )
            self.behaviour = model

    def expand(
        self, prompt_ids: list[list[int]], records: list[Any], offset: int
    ) -> tuple[list[list[int]], list[Any], torch.Tensor | None, int]:
        """Each prompt (and its record) ``samples_per_prompt`` times in a row, the group of every row (``None`` for
        one sample each: one group, the batch) and the first row's global index (``offset`` prompts before it)."""
        n = self.samples_per_prompt
        if n == 1:
            return prompt_ids, records, None, offset
        groups = torch.arange(len(prompt_ids)).repeat_interleave(n)
        return [p for p in prompt_ids for _ in range(n)], [r for r in records for _ in range(n)], groups, offset * n

    def sampler(self, student: nn.Module, student_sampler: StudentSampler | None) -> StudentSampler:
        """What samples this micro-batch: the off-policy model, else ``student_sampler`` (the vLLM engine), else
        ``generate`` on the training ``student``."""
        if self.behaviour is not None:
            return HFStudentSampler(self.behaviour, seed_per_row=self.seed_per_row)
        if student_sampler is not None:
            return student_sampler
        return HFStudentSampler(student, seed_per_row=self.seed_per_row)
