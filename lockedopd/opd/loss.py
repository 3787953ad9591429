"""Turn one scored rollout into the configured OPD loss (objective + sparsification + reward mixing)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lockedopd.opd import objectives as obj
from lockedopd.opd.config import ObjectiveConfig
from lockedopd.opd.objective_registry import ObjectiveInputs, get_objective
from lockedopd.teachers.base import TeacherScores


def teacher_request(config: ObjectiveConfig) -> dict:
    """What the objective needs from the teacher: ``{"top_k": k, "full_logprobs": bool}``."""
    return get_objective(config.name).teacher_request(config.top_k)


@dataclass
class LossOutput:
    """The loss to back-propagate and the statistics logged with it."""

    loss: torch.Tensor
    reverse_kl: float  # mean per-token sampled estimate log π_S(y) − log π_T(y) on all completion tokens
    tokens: int
    kept_tokens: int
    exact_reverse_kl: float | None = None
    reward_mean: float | None = None

    @classmethod
    def of(
        cls,
        loss: torch.Tensor,
        sampled_kl: torch.Tensor,
        mask: torch.Tensor,
        keep: torch.Tensor,
        exact_kl: torch.Tensor | None,
        rewards: torch.Tensor | None,
    ) -> LossOutput:
        """``loss`` with its statistics: mean sampled (and exact) KL over ``mask``, token counts, mean reward."""
        return cls(
            loss=loss,
            reverse_kl=float(obj.masked_mean(sampled_kl, mask)),
            tokens=int(mask.sum()),
            kept_tokens=int(keep.sum()),
            exact_reverse_kl=None if exact_kl is None else float(obj.masked_mean(exact_kl, mask)),
            reward_mean=None if rewards is None else float(rewards.float().mean()),
        )


def kept_tokens_and_reward_advantages(
    exact_kl: torch.Tensor | None,
    sampled_kl: torch.Tensor,
    mask: torch.Tensor,
    config: ObjectiveConfig,
    rewards: torch.Tensor | None,
    generator: torch.Generator | None,
    group_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens the loss keeps (``objective.token_keep_fraction``, ranked by the exact KL where there is one, else
    the sampled-token KL) and the reward advantages (``None`` unless ``reward_lambda < 1`` or the objective trains on
    rewards alone): each reward minus the mean reward of its group (the samples of one prompt, ``group_ids``; the
    whole batch without groups)."""
    keep = mask
    if config.token_keep_fraction < 1.0:
        keep = obj.sparsify_token_mask(
            exact_kl if exact_kl is not None else sampled_kl,
            mask,
            config.token_keep_fraction,
            config.token_keep_mode,
            generator,
        )
    reward_adv = None
    needs_reward = get_objective(config.name).needs_reward
    if config.reward_lambda < 1.0 or needs_reward:
        if rewards is None:
            why = f"objective.name={config.name}" if needs_reward else "objective.reward_lambda < 1"
            raise ValueError(f"{why} needs rewards for the batch: set objective.reward_fn.")
        reward_adv = obj.group_normalized_rewards(rewards, group_ids).to(mask.device)
    return keep, reward_adv


def check_completions_match(what: str, completions: tuple[int, ...], mask: torch.Tensor) -> None:
    """Raise ``ValueError`` unless the teacher's scores (completion ``mask``) cover the student's ``(B, C)``
    completions; ``what`` names the student side."""
    if tuple(completions) != tuple(mask.shape):
        raise ValueError(
            f"{what} {tuple(completions)} and teacher scores {tuple(mask.shape)} do not cover the same completions; "
            "score the rollout's own sequences."
        )


def check_same_vocabulary(teacher_vocab: int | None, student_vocab: int) -> None:
    """Raise ``ValueError`` when the teacher's full-vocabulary scores (``None``: it sent none) have another size."""
    if teacher_vocab is not None and teacher_vocab != student_vocab:
        raise ValueError(
            f"teacher vocabulary ({teacher_vocab}) differs from the student's ({student_vocab}): teacher and student "
            "must share one tokenizer."
        )


def mixed_advantages(
    advantages: torch.Tensor, reward_adv: torch.Tensor | None, reward_in_advantage: bool, config: ObjectiveConfig
) -> torch.Tensor:
    """The objective's advantages: the OPD advantages, mixed with the reward advantages when the objective takes the
    reward inside its advantage (``reward_in_advantage``), the reward advantages alone for an objective that trains
    on rewards (``rlvr``); else unchanged (the reward is then a separate loss)."""
    if reward_adv is not None and get_objective(config.name).needs_reward:
        return obj.mix_advantages(advantages, reward_adv, 0.0)
    if reward_adv is not None and reward_in_advantage:
        return obj.mix_advantages(advantages, reward_adv, config.reward_lambda)
    return advantages


def with_reward_loss(
    loss: torch.Tensor,
    student_tok: torch.Tensor,
    reward_adv_tokens: torch.Tensor | None,
    keep: torch.Tensor,
    config: ObjectiveConfig,
) -> torch.Tensor:
    """``loss`` mixed with the reward's policy-gradient loss (weight ``1 - reward_lambda``) when the reward is a
    separate term (``reward_adv_tokens``, one advantage per token); else ``loss`` unchanged."""
    if reward_adv_tokens is None:
        return loss
    reward_loss = obj.policy_gradient_loss(student_tok, reward_adv_tokens, keep)
    return config.reward_lambda * loss + (1.0 - config.reward_lambda) * reward_loss


def compute_opd_loss(
    student_logprobs: torch.Tensor,
    completion_ids: torch.Tensor,
    scores: TeacherScores,
    config: ObjectiveConfig,
    *,
    rewards: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    group_ids: torch.Tensor | None = None,
) -> LossOutput:
    """Assemble the OPD loss for one micro-batch.

    Args:
        student_logprobs: ``(B, C, V)`` student log-probs at completion positions, with grad.
        completion_ids: ``(B, C)`` sampled tokens.
        scores: the teacher's scores for the same completions (``mask`` is the completion mask).
        config: objective settings.
        rewards: ``(B,)`` verifiable rewards, required when ``config.reward_lambda < 1`` (and for ``rlvr``).
        generator: random source for random token sparsification.
        group_ids: ``(B,)`` the prompt each sequence samples (its reward's baseline is its group's mean reward);
            ``None``: one group.
    """
    device = student_logprobs.device
    mask = scores.mask.to(device)
    check_completions_match("student log-probs", tuple(student_logprobs.shape[:2]), mask)
    teacher_full = scores.dense_full_logprobs()
    check_same_vocabulary(None if teacher_full is None else teacher_full.shape[-1], student_logprobs.shape[-1])
    student_tok = obj.gather_token_logprobs(student_logprobs, completion_ids.to(device))
    teacher_tok = scores.token_logprobs.to(device)
    advantages = obj.opd_advantages(student_tok, teacher_tok)
    sampled_kl = -advantages

    exact_kl = None
    teacher_full = None if teacher_full is None else teacher_full.to(device)
    if teacher_full is not None:
        with torch.no_grad():  # a statistic: no graph (whose saved exp and log-ratio would be vocabulary-sized)
            exact_kl = obj.reverse_kl_per_token(student_logprobs, teacher_full)

    keep, reward_adv = kept_tokens_and_reward_advantages(
        exact_kl, sampled_kl, mask, config, rewards, generator, group_ids
    )

    objective = get_objective(config.name)
    objective.check_scores(scores)
    adv = mixed_advantages(advantages, reward_adv, objective.reward_in_advantage, config)
    inputs = ObjectiveInputs(
        student_logprobs=student_logprobs,
        student_token_logprobs=student_tok,
        completion_ids=completion_ids.to(device),
        teacher_token_logprobs=teacher_tok,
        teacher_topk_ids=None if scores.topk_ids is None else scores.topk_ids.to(device),
        teacher_topk_logprobs=None if scores.topk_logprobs is None else scores.topk_logprobs.to(device),
        teacher_full_logprobs=teacher_full,
        advantages=adv,
        mask=keep,
        config=config,
    )
    reward_tokens = None
    if reward_adv is not None and not objective.reward_in_advantage:
        reward_tokens = reward_adv.unsqueeze(-1).expand_as(student_tok)
    loss = with_reward_loss(objective.loss(inputs), student_tok, reward_tokens, keep, config)

    return LossOutput.of(loss, sampled_kl, mask, keep, exact_kl, rewards)
