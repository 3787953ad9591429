"""Held-out evaluation: the mean per-token reverse KL(student ‖ teacher) on the student's own samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lockedopd.opd.objectives import masked_mean, reverse_kl_per_token
from lockedopd.opd.rollout import HFStudentSampler, StudentSampler, student_completion_logprobs
from lockedopd.teachers.base import TeacherScorer


@dataclass
class EvalResult:
    """Held-out metrics. ``exact`` says whether the KL is the full-vocabulary one or the sampled estimate."""

    reverse_kl: float
    sampled_reverse_kl: float
    tokens: int
    exact: bool
    mean_completion_tokens: float

    def as_dict(self, prefix: str = "eval_") -> dict:
        """Flat dict for metrics.jsonl."""
        return {
            f"{prefix}reverse_kl": self.reverse_kl,
            f"{prefix}sampled_reverse_kl": self.sampled_reverse_kl,
            f"{prefix}tokens": self.tokens,
            f"{prefix}kl_exact": self.exact,
            f"{prefix}mean_completion_tokens": self.mean_completion_tokens,
        }


@torch.no_grad()
def evaluate_reverse_kl(
    student: nn.Module,
    teacher: TeacherScorer,
    prompt_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    eos_token_id,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    temperature: float = 1.0,
    exact: bool = True,
    sampler: StudentSampler | None = None,
) -> EvalResult:
    """Sample the student on held-out prompts (seeded, temperature ``temperature``) and measure KL to the teacher.

    With ``exact=True`` (needs a teacher that returns full log-probs) the per-token KL is the exact
    full-vocabulary reverse KL; otherwise the sampled estimate log π_S(y) − log π_T(y). Both are token-weighted.
    ``sampler`` (e.g. a :class:`~lockedopd.opd.vllm_rollout.VLLMStudentSampler`) samples instead of
    :class:`~lockedopd.opd.rollout.HFStudentSampler` on ``student``.
    """
    if not prompt_ids:
        raise ValueError("evaluate_reverse_kl: no held-out prompts.")
    kl_sum = sampled_sum = 0.0
    tokens = 0
    rows = 0
    was_training = student.training
    student.eval()
    sampler = sampler if sampler is not None else HFStudentSampler(student)
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        rollout = sampler.generate(
            chunk, pad_token_id, eos_token_id, max_new_tokens, temperature=temperature, seed=seed + start
        )
        scores = teacher.score(rollout.sequences(), rollout.prompt_lengths, full_logprobs=exact)
        student_lp = student_completion_logprobs(student, rollout)
        mask = rollout.completion_mask
        student_tok = student_lp.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
        sampled = student_tok - scores.token_logprobs
        n = int(mask.sum())
        sampled_sum += float(masked_mean(sampled, mask)) * n
        if exact:
            kl_sum += float(masked_mean(reverse_kl_per_token(student_lp, scores.full_logprobs), mask)) * n
        tokens += n
        rows += len(chunk)
    student.train(was_training)
    sampled_kl = sampled_sum / max(tokens, 1)
    return EvalResult(
        reverse_kl=kl_sum / max(tokens, 1) if exact else sampled_kl,
        sampled_reverse_kl=sampled_kl,
        tokens=tokens,
        exact=exact,
        mean_completion_tokens=tokens / max(rows, 1),
    )
