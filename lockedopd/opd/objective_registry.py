"""OPD objectives by name: the loss each ``objective.name`` computes and what it needs from the teacher.

An objective is one function of :class:`ObjectiveInputs` registered under a name::

    from lockedopd.opd.objective_registry import ObjectiveInputs, register_objective

    @register_objective("my_kl", needs=FULL_LOGPROBS)
    def my_kl(inputs: ObjectiveInputs) -> torch.Tensor:
        return masked_mean(my_kl_per_token(inputs.student_logprobs, inputs.teacher_full_logprobs), inputs.mask)

Once the module holding it is imported, ``objective.name=my_kl`` validates, the teacher is asked for what the
objective needs, and :func:`lockedopd.opd.loss.compute_opd_loss` calls it. What an objective needs decides which
teachers can serve it: only teachers whose ``returns_full_logprobs`` is true serve ``FULL_LOGPROBS`` objectives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lockedopd.opd import objectives as obj
from lockedopd.registry import Registry
from lockedopd.teachers.base import TeacherScores

#: The teacher's log-prob of the sampled token only (every scorer returns it).
SAMPLED_TOKEN = "sampled_token"
#: The sampled token plus the teacher's ``objective.top_k`` most likely tokens and their log-probs.
TOP_K = "top_k"
#: The teacher's whole next-token distribution (only scorers with ``returns_full_logprobs``).
FULL_LOGPROBS = "full_logprobs"
#: Nothing: the objective trains on the data's own completions (``sft``); the run needs no teacher.
NO_TEACHER = "none"
#: No teacher either, but the student's own samples, judged by the verifier (``objective.reward_fn``): their
#: group-normalised rewards are the objective's advantages (``rlvr``).
REWARD = "reward"
TEACHER_NEEDS = (SAMPLED_TOKEN, TOP_K, FULL_LOGPROBS, NO_TEACHER, REWARD)


@dataclass(frozen=True)
class ObjectiveInputs:
    """What an objective's loss function gets for one micro-batch (all on the student's device).

    Attributes:
        student_logprobs: ``(B, C, V)`` student log-probs at the completion positions, with grad.
        student_token_logprobs: ``(B, C)`` the sampled tokens' student log-probs, with grad.
        completion_ids: ``(B, C)`` the sampled tokens.
        teacher_token_logprobs: ``(B, C)`` the teacher's log-probs of the sampled tokens.
        teacher_topk_ids / teacher_topk_logprobs: ``(B, C, k)`` the teacher's top-k (``TOP_K`` objectives).
        teacher_full_logprobs: ``(B, C, V)`` the teacher's full distribution (``FULL_LOGPROBS`` objectives).
        advantages: ``(B, C)`` the per-token OPD advantages log π_T − log π_S (detached); for objectives registered
            with ``reward_in_advantage=True`` already mixed with the reward advantages (λ·A_OPD + (1−λ)·A_reward);
            for :data:`REWARD` objectives the reward advantages alone.
        mask: ``(B, C)`` bool, the tokens that count (after token sparsification).
        config: the :class:`~lockedopd.opd.config.ObjectiveConfig` (``top_k``, ``topk_tail``, ``beta``, ...).
    """

    student_logprobs: torch.Tensor
    student_token_logprobs: torch.Tensor
    completion_ids: torch.Tensor
    teacher_token_logprobs: torch.Tensor
    teacher_topk_ids: torch.Tensor | None
    teacher_topk_logprobs: torch.Tensor | None
    teacher_full_logprobs: torch.Tensor | None
    advantages: torch.Tensor
    mask: torch.Tensor
    config: Any


ObjectiveFn = Callable[[ObjectiveInputs], torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """A registered objective.

    Attributes:
        name: the ``objective.name`` value.
        loss: the scalar loss of one micro-batch from :class:`ObjectiveInputs`.
        needs: what it needs from the teacher: :data:`SAMPLED_TOKEN`, :data:`TOP_K` or :data:`FULL_LOGPROBS`; or
            no teacher: :data:`NO_TEACHER` (given completions) or :data:`REWARD` (the verifier on samples).
        reward_in_advantage: a policy gradient on ``inputs.advantages``, into which a verifiable reward is mixed
            (``objective.reward_lambda < 1``); otherwise the reward's policy-gradient loss is mixed into the loss:
            λ·loss + (1−λ)·loss_reward.
        token_mean: the loss is a mean over ``inputs.mask``'s tokens of per-token terms (every built-in objective),
            so it can be computed over chunks of tokens and recombined (``objective.chunk_size > 0``,
            :mod:`lockedopd.opd.chunked_loss`); register ``token_mean=False`` for a loss that mixes tokens.

    An objective that needs :data:`NO_TEACHER` trains on the completions the data gives (each record's
    ``completion``) instead of the student's samples, and its run builds no teacher.
    """

    name: str
    loss: ObjectiveFn
    needs: str
    reward_in_advantage: bool = False
    token_mean: bool = True

    @property
    def needs_full_logprobs(self) -> bool:
        """Whether only teachers that return full-vocabulary log-probs can serve it."""
        return self.needs == FULL_LOGPROBS

    @property
    def needs_teacher(self) -> bool:
        """Whether the objective scores the student against a teacher (false: it trains on given completions, or on
        its samples' rewards)."""
        return self.needs not in (NO_TEACHER, REWARD)

    @property
    def samples_student(self) -> bool:
        """Whether the objective trains on sampled rollouts (false: on the data's given completions)."""
        return self.needs != NO_TEACHER

    @property
    def needs_reward(self) -> bool:
        """Whether the objective's advantages are the verifier's rewards alone."""
        return self.needs == REWARD

    def teacher_request(self, top_k: int) -> dict[str, Any]:
        """Keyword arguments of ``TeacherScorer.score``: ``{"top_k": k, "full_logprobs": bool}``."""
        return {"top_k": top_k if self.needs == TOP_K else 0, "full_logprobs": self.needs_full_logprobs}

    def check_scores(self, scores: TeacherScores) -> None:
        """Raise ``ValueError`` when the teacher's scores lack what this objective needs."""
        if self.needs == FULL_LOGPROBS and not scores.has_full_logprobs:
            raise ValueError(
                f"objective {self.name!r} needs full-vocabulary teacher log-probs, which only the in-process teacher "
                "(teacher.backend=hf) provides; use objective.name=pg or topk_reverse_kl with remote teachers."
            )
        if self.needs == TOP_K and scores.topk_ids is None:
            raise ValueError(f"objective {self.name} needs the teacher's top-k ids; the scorer returned none.")


#: Every registered objective by name (filled by :func:`register_objective`).
OBJECTIVES: Registry[Objective] = Registry(
    "objective.name", "register new ones with lockedopd.opd.objective_registry.register_objective"
)


def register_objective(
    name: str, needs: str, reward_in_advantage: bool = False, replace: bool = False, token_mean: bool = True
) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Decorator: register a loss function as the objective ``name``.

    Args:
        name: the ``objective.name`` value.
        needs: :data:`SAMPLED_TOKEN`, :data:`TOP_K`, :data:`FULL_LOGPROBS`, :data:`NO_TEACHER` or :data:`REWARD`.
        reward_in_advantage: see :class:`Objective`.
        replace: allow replacing an existing registration (otherwise a second registration is an error).
        token_mean: see :class:`Objective` (``False`` refuses ``objective.chunk_size > 0``).
    """
    if needs not in TEACHER_NEEDS:
        raise ValueError(f"register_objective: needs={needs!r} is not one of {list(TEACHER_NEEDS)}.")
    OBJECTIVES.check_new(name, replace)

    def decorator(loss: ObjectiveFn) -> ObjectiveFn:
        OBJECTIVES.register(name, Objective(name, loss, needs, reward_in_advantage, token_mean), replace)
        return loss

    return decorator


def get_objective(name: str) -> Objective:
    """The objective registered as ``name``; a ``ValueError`` naming the registered ones otherwise."""
    return OBJECTIVES.lookup(name)


def full_vocabulary_objective(loss: Callable[..., torch.Tensor]) -> ObjectiveFn:
    """The objective of ``loss(student_logprobs, teacher_full_logprobs, mask)`` (e.g. the exact KLs of
    :mod:`lockedopd.opd.objectives`); it keeps ``loss``'s name and docstring."""

    def objective(inputs: ObjectiveInputs) -> torch.Tensor:
        return loss(inputs.student_logprobs, inputs.teacher_full_logprobs, inputs.mask)

    return functools.wraps(loss)(objective)


# ----------------------------------------------------------------------------------------- built-in objectives


@register_objective("sft", needs=NO_TEACHER)
def supervised_fine_tuning(inputs: ObjectiveInputs) -> torch.Tensor:
    """Supervised fine-tuning: cross-entropy on the data's given completions (``completion`` of each record); the
    prompt's tokens carry no loss."""
    return obj.cross_entropy_loss(inputs.student_token_logprobs, inputs.mask)


@register_objective("rlvr", needs=REWARD)
def reinforce_with_verifiable_rewards(inputs: ObjectiveInputs) -> torch.Tensor:
    """RLVR: policy gradient on the student's own samples with the verifier's reward as advantage, minus the mean
    reward of the samples of the same prompt (``rollout.samples_per_prompt`` > 1; GRPO's group baseline without its
    division by the group's standard deviation); no teacher."""
    return obj.policy_gradient_loss(inputs.student_token_logprobs, inputs.advantages, inputs.mask)


@register_objective("pg", needs=SAMPLED_TOKEN, reward_in_advantage=True)
def policy_gradient(inputs: ObjectiveInputs) -> torch.Tensor:
    """The paper's objective: policy gradient with the per-token advantage log π_T(y) − log π_S(y)."""
    return obj.policy_gradient_loss(inputs.student_token_logprobs, inputs.advantages, inputs.mask)


reverse_kl = register_objective("reverse_kl", needs=FULL_LOGPROBS)(full_vocabulary_objective(obj.reverse_kl_loss))


@register_objective("topk_reverse_kl", needs=TOP_K)
def topk_reverse_kl(inputs: ObjectiveInputs) -> torch.Tensor:
    """Reverse KL on the teacher's top-k, the tail per ``objective.topk_tail``."""
    return obj.topk_reverse_kl_loss(
        inputs.student_logprobs,
        inputs.teacher_topk_ids,
        inputs.teacher_topk_logprobs,
        inputs.mask,
        tail=inputs.config.topk_tail,
        sampled_ids=inputs.completion_ids,
        teacher_token_logprobs=inputs.teacher_token_logprobs,
    )


forward_kl = register_objective("forward_kl", needs=FULL_LOGPROBS)(full_vocabulary_objective(obj.forward_kl_loss))


@register_objective("jsd", needs=FULL_LOGPROBS)
def jsd(inputs: ObjectiveInputs) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence with ``objective.beta``."""
    return obj.generalized_jsd_loss(
        inputs.student_logprobs, inputs.teacher_full_logprobs, inputs.mask, inputs.config.beta
    )
