"""OPD objectives as pure functions with documented shapes.

Shapes: ``B`` sequences, ``T`` completion positions, ``V`` vocabulary, ``k`` teacher top-k. Every loss takes a
boolean ``mask`` of shape ``(B, T)`` (True on real completion tokens) and returns a scalar averaged over the
unmasked tokens (or a weighted average when ``weights`` is given).
"""

from __future__ import annotations

import math

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` ``(B, T)`` over ``mask`` ``(B, T)``; optional per-token ``weights`` ``(B, T)``."""
    w = mask.to(values.dtype)
    if weights is not None:
        w = w * weights.to(values.dtype)
    return (values * w).sum() / w.sum().clamp_min(1e-12)


def gather_token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Pick ``logprobs[b, t, tokens[b, t]]``: ``(B, T, V)``, ``(B, T)`` → ``(B, T)``."""
    return logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def opd_advantages(student_token_logprobs: torch.Tensor, teacher_token_logprobs: torch.Tensor) -> torch.Tensor:
    """The paper's dense per-token advantage r_t = log π_T(y_t) − log π_θ(y_t), detached: ``(B, T)``.

    Its negative is the per-token sampled estimate of the reverse KL(π_θ ‖ π_T).
    """
    return (teacher_token_logprobs - student_token_logprobs).detach()


def cross_entropy_loss(student_token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning: the mean negative log-likelihood of the given tokens over ``mask``."""
    return -masked_mean(student_token_logprobs, mask)


def policy_gradient_loss(
    student_token_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    old_token_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense policy-gradient loss −E[A_t · ρ_t] over sampled tokens.

    Args:
        student_token_logprobs: ``(B, T)`` log π_θ(y_t), with grad.
        advantages: ``(B, T)`` per-token advantages (treated as constants).
        mask: ``(B, T)`` bool.
        weights: optional ``(B, T)`` token weights (e.g. from sparsification).
        old_token_logprobs: ``(B, T)`` log-probs of the policy that sampled the tokens; when given, the
            importance ratio ρ_t = exp(log π_θ − log π_old) is used (off-policy rollouts). Otherwise ρ_t's
            gradient equals ∇log π_θ (on-policy, ratio 1 at the sampling point).
    """
    if old_token_logprobs is None:
        old_token_logprobs = student_token_logprobs.detach()
    ratio = torch.exp(student_token_logprobs - old_token_logprobs)
    return -masked_mean(advantages.detach() * ratio, mask, weights)


#: Elements of one block of the exact reverse KL's temporaries (16 MiB of float32): the (B, T, V) log-ratio and
#: probabilities are made one block of rows at a time, never for the whole batch.
KL_BLOCK_ELEMENTS = 1 << 22


def _row_blocks(rows: int, width: int) -> list[tuple[int, int]]:
    step = max(1, KL_BLOCK_ELEMENTS // max(width, 1))
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


def _blocked_reverse_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Σ_v exp(s_v)·(s_v − t_v) of ``(N, V)`` rows, one block of rows at a time (no graph)."""
    out = torch.empty(student.shape[0], dtype=torch.promote_types(student.dtype, teacher.dtype), device=student.device)
    for a, b in _row_blocks(student.shape[0], student.shape[-1]):
        s_blk = student[a:b]
        out[a:b] = (s_blk - teacher[a:b]).mul_(s_blk.exp()).sum(-1)
    return out


class _ReverseKLPerToken(torch.autograd.Function):
    """Σ_v exp(s_v)·(s_v − t_v) over rows of ``(N, V)``, saving only its inputs for backward.

    Autograd of the plain expression saves two more vocabulary-sized tensors (exp(s) and s − t) and makes three at
    once; here both passes work one block of rows at a time and the backward recomputes the terms from ``s`` (which
    ``log_softmax`` keeps anyway) and ``t`` (the teacher's, alive regardless): ∂/∂s_v = exp(s_v)·(s_v − t_v + 1),
    ∂/∂t_v = −exp(s_v).
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(student, teacher)
        return _blocked_reverse_kl(student, teacher)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        student, teacher = ctx.saved_tensors
        need_student, need_teacher = ctx.needs_input_grad[:2]
        grad_student = torch.empty_like(student) if need_student else None
        grad_teacher = torch.empty_like(teacher) if need_teacher else None
        for a, b in _row_blocks(student.shape[0], student.shape[-1]):
            p = student[a:b].exp()
            g = grad[a:b].unsqueeze(-1)
            if need_student:
                torch.sub(student[a:b], teacher[a:b], out=grad_student[a:b])
                grad_student[a:b].add_(1.0).mul_(p).mul_(g)
            if need_teacher:
                torch.mul(p, g, out=grad_teacher[a:b]).neg_()
        return grad_student, grad_teacher


def reverse_kl_per_token(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Exact KL(π_S ‖ π_T) at each position: ``(B, T, V)`` × 2 → ``(B, T)``.

    Same value and gradient as autograd of ``(exp(s) · (s − t)).sum(-1)``, but it saves no tensor beyond its two
    inputs and makes its ``(B, T, V)`` temporaries one block of rows at a time (:class:`_ReverseKLPerToken`),
    where the plain expression saves two more ``(B, T, V)`` tensors and holds three at once. Inputs of different
    shapes (broadcasting) or layouts fall back to the plain expression.
    """
    s, t = student_logprobs, teacher_logprobs
    if s.shape != t.shape or not (s.is_contiguous() and t.is_contiguous()) or s.dim() < 1:
        return (s.exp() * (s - t)).sum(-1)
    width = s.shape[-1]
    flat_s, flat_t = s.reshape(-1, width), t.reshape(-1, width)
    if torch.is_grad_enabled() and (s.requires_grad or t.requires_grad):
        return _ReverseKLPerToken.apply(flat_s, flat_t).reshape(s.shape[:-1])
    return _blocked_reverse_kl(flat_s, flat_t).reshape(s.shape[:-1])


def forward_kl_per_token(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Exact KL(π_T ‖ π_S) at each position: ``(B, T, V)`` × 2 → ``(B, T)``."""
    return (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)


def reverse_kl_loss(student_logprobs, teacher_logprobs, mask, weights=None) -> torch.Tensor:
    """Mean exact reverse KL(π_S ‖ π_T) over masked tokens; inputs ``(B, T, V)`` log-probs."""
    return masked_mean(reverse_kl_per_token(student_logprobs, teacher_logprobs), mask, weights)


def forward_kl_loss(student_logprobs, teacher_logprobs, mask, weights=None) -> torch.Tensor:
    """Mean exact forward KL(π_T ‖ π_S) over masked tokens; inputs ``(B, T, V)`` log-probs."""
    return masked_mean(forward_kl_per_token(student_logprobs, teacher_logprobs), mask, weights)


TOPK_TAILS = ("sampled", "bucket", "renormalize")


def topk_reverse_kl_per_token(
    student_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    tail: str = "bucket",
) -> torch.Tensor:
    """Deterministic reverse KL on the teacher's top-k support (what a remote teacher such as vLLM returns).

    Args:
        student_logprobs: ``(B, T, V)`` full student log-probs.
        teacher_topk_ids: ``(B, T, k)`` ids of the teacher's top-k tokens (distinct within a position).
        teacher_topk_logprobs: ``(B, T, k)`` their teacher log-probs.
        tail: ``"bucket"`` compares the k tokens plus one bucket holding all other tokens' mass (1 − Σ top-k
            probabilities, for each model): the KL of the coarse-grained distributions, a lower bound on the exact
            reverse KL. ``"renormalize"`` renormalises both models on the k ids, which leaves the student's mass
            outside them unconstrained. (``"sampled"``, the unbiased variant, needs the sampled tokens: see
            :func:`topk_sampled_tail_reverse_kl`.)
    Returns:
        ``(B, T)`` per-token KL; exact when k = V.
    """
    student_k = student_logprobs.gather(-1, teacher_topk_ids)
    if tail == "renormalize":
        s = torch.log_softmax(student_k, dim=-1)
        t = torch.log_softmax(teacher_topk_logprobs, dim=-1)
        return (s.exp() * (s - t)).sum(-1)
    if tail != "bucket":
        raise ValueError(f"topk_reverse_kl_per_token: tail must be 'bucket' or 'renormalize', got {tail!r}.")
    kl = (student_k.exp() * (student_k - teacher_topk_logprobs)).sum(-1)
    s_tail = _log_tail_mass(student_k)
    t_tail = _log_tail_mass(teacher_topk_logprobs)
    return kl + s_tail.exp() * (s_tail - t_tail)


def _log_tail_mass(topk_logprobs: torch.Tensor, floor: float = 1e-12) -> torch.Tensor:
    """log(1 − Σ exp(topk_logprobs)) over the last dim, floored so a (numerically) full top-k stays finite."""
    covered = torch.logsumexp(topk_logprobs, dim=-1)
    # log(1 - e^c) = log(-expm1(c)); c ≤ 0 up to rounding, and the floor keeps padded or full rows finite.
    return torch.log((-torch.expm1(covered.clamp(max=0.0))).clamp_min(floor))


def topk_sampled_tail_reverse_kl(
    student_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    sampled_ids: torch.Tensor,
    teacher_token_logprobs: torch.Tensor,
) -> torch.Tensor:
    """Unbiased per-token reverse KL from a top-k teacher: exact on the top-k, sampled on the tail.

    KL(π_S ‖ π_T) = Σ_{v∈K} π_S(v)·log(π_S(v)/π_T(v)) + Σ_{v∉K} π_S(v)·log(π_S(v)/π_T(v)). The first sum is
    computed exactly from the teacher's top-k K; the second is estimated by 1[y∉K]·log(π_S(y)/π_T(y)) with y the
    token the student sampled there (y ~ π_S, and every scorer returns π_T(y)). The returned ``(B, T)`` tensor has
    that estimate as its value and, in expectation over y, the exact KL's gradient: the top-k sum and the student's
    tail mass are differentiated directly, the tail estimate as a score-function term
    1[y∉K]·sg(log π_S(y) − log π_T(y))·∇log π_S(y).

    Args:
        student_logprobs: ``(B, T, V)`` full student log-probs (with grad).
        teacher_topk_ids / teacher_topk_logprobs: ``(B, T, k)`` the teacher's top-k ids and log-probs.
        sampled_ids: ``(B, T)`` the tokens the student sampled.
        teacher_token_logprobs: ``(B, T)`` the teacher's log-probs of those tokens.
    """
    student_k = student_logprobs.gather(-1, teacher_topk_ids)
    head = (student_k.exp() * (student_k - teacher_topk_logprobs)).sum(-1)
    student_tail_mass = 1.0 - student_k.exp().sum(-1)
    student_y = student_logprobs.gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1)
    in_tail = ~(teacher_topk_ids == sampled_ids.unsqueeze(-1)).any(-1)
    tail_sample = in_tail.to(student_y.dtype) * (student_y - teacher_token_logprobs).detach()
    estimate = head + tail_sample
    surrogate = head + student_tail_mass + tail_sample * student_y
    # value of the estimate, gradient of the surrogate
    return estimate.detach() + (surrogate - surrogate.detach())


def topk_reverse_kl_loss(
    student_logprobs,
    teacher_topk_ids,
    teacher_topk_logprobs,
    mask,
    weights=None,
    tail: str = "bucket",
    sampled_ids: torch.Tensor | None = None,
    teacher_token_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean top-k reverse KL over masked tokens; ``tail="sampled"`` also needs the sampled tokens and their
    teacher log-probs (:func:`topk_sampled_tail_reverse_kl`), the other tails use :func:`topk_reverse_kl_per_token`.
    """
    if tail == "sampled":
        if sampled_ids is None or teacher_token_logprobs is None:
            raise ValueError("topk_reverse_kl_loss: tail='sampled' needs sampled_ids and teacher_token_logprobs.")
        per_token = topk_sampled_tail_reverse_kl(
            student_logprobs, teacher_topk_ids, teacher_topk_logprobs, sampled_ids, teacher_token_logprobs
        )
    else:
        per_token = topk_reverse_kl_per_token(student_logprobs, teacher_topk_ids, teacher_topk_logprobs, tail)
    return masked_mean(per_token, mask, weights)


def generalized_jsd_per_token(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float):
    """Generalised Jensen-Shannon divergence per token, TRL's convention: ``(B, T, V)`` × 2 → ``(B, T)``.

    With mixture M = β·π_S + (1−β)·π_T: JSD_β = β·KL(π_T ‖ M) + (1−β)·KL(π_S ‖ M). The limits are
    β = 0 → forward KL(π_T ‖ π_S) and β = 1 → reverse KL(π_S ‖ π_T), as in TRL's ``generalized_jsd_loss``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized JSD: beta must be in [0, 1], got {beta}.")
    if beta == 0.0:
        return forward_kl_per_token(student_logprobs, teacher_logprobs)
    if beta == 1.0:
        return reverse_kl_per_token(student_logprobs, teacher_logprobs)
    mixture = torch.logsumexp(
        torch.stack([student_logprobs + math.log(beta), teacher_logprobs + math.log(1 - beta)]), dim=0
    )
    kl_teacher = (teacher_logprobs.exp() * (teacher_logprobs - mixture)).sum(-1)
    kl_student = (student_logprobs.exp() * (student_logprobs - mixture)).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


def generalized_jsd_loss(student_logprobs, teacher_logprobs, mask, beta: float = 0.5, weights=None):
    """Mean generalised JSD over masked tokens (see :func:`generalized_jsd_per_token`)."""
    return masked_mean(generalized_jsd_per_token(student_logprobs, teacher_logprobs, beta), mask, weights)


def sparsify_token_mask(
    scores: torch.Tensor,
    mask: torch.Tensor,
    keep_fraction: float,
    mode: str = "top",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep exactly ``round(keep_fraction · n)`` of the ``n`` unmasked tokens of the batch (the paper's control).

    Args:
        scores: ``(B, T)`` per-token scores (e.g. the per-token reverse KL); used by ``mode="top"``.
        mask: ``(B, T)`` bool, the tokens eligible.
        keep_fraction: in (0, 1].
        mode: ``"top"`` keeps the highest-scoring tokens, ``"random"`` a uniformly random subset.
        generator: random source for ``mode="random"``.
    Returns:
        ``(B, T)`` bool mask, a subset of ``mask``.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"sparsify_token_mask: keep_fraction must be in (0, 1], got {keep_fraction}.")
    n = int(mask.sum())
    keep = int(round(keep_fraction * n))
    if keep_fraction == 1.0 or n == 0:
        return mask.clone()
    if mode == "top":
        key = scores.detach().float().masked_fill(~mask, float("-inf"))
    elif mode == "random":
        key = torch.rand(mask.shape, generator=generator).masked_fill(~mask, float("-inf"))
    else:
        raise ValueError(f"sparsify_token_mask: mode must be 'top' or 'random', got {mode!r}.")
    chosen = torch.zeros(mask.numel(), dtype=torch.bool)
    if keep:
        chosen[key.flatten().topk(keep).indices] = True
    return chosen.view_as(mask) & mask


def mix_advantages(
    opd_advantages_: torch.Tensor, reward_advantages: torch.Tensor, lam: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The paper's objective mixing A = λ·A_OPD + (1−λ)·A_reward.

    Args:
        opd_advantages_: ``(B, T)`` per-token OPD advantages.
        reward_advantages: ``(B,)`` per-sequence advantages (broadcast over tokens) or ``(B, T)``.
        lam: λ in [0, 1]; λ = 1 is pure OPD.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mix_advantages: lambda must be in [0, 1], got {lam}.")
    if reward_advantages.dim() == 1:
        reward_advantages = reward_advantages.unsqueeze(-1).expand_as(opd_advantages_)
    mixed = lam * opd_advantages_ + (1.0 - lam) * reward_advantages.to(opd_advantages_.dtype)
    return mixed if mask is None else mixed * mask


def group_normalized_rewards(rewards: torch.Tensor, group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Turn per-sequence rewards ``(B,)`` into advantages: minus the group mean (GRPO style, no std scaling).

    Sequences with the same ``group_ids`` entry (completions of one prompt) share a baseline; without groups the
    batch mean is the baseline.
    """
    rewards = rewards.float()
    if group_ids is None:
        return rewards - rewards.mean()
    out = torch.empty_like(rewards)
    for g in group_ids.unique():
        sel = group_ids == g
        out[sel] = rewards[sel] - rewards[sel].mean()
    return out
