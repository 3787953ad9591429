"""The OPD loss over chunks of completion tokens, so no ``[tokens × vocab]`` tensor of the whole batch exists.

Unchunked, a step holds the student's logits, log-softmax and probabilities and the teacher's log-probs for every
completion position at once: ``B × C × V`` floats each (Qwen3's 151k vocabulary × 8 × 4k tokens is ~20 GB per copy).
Chunked (``objective.chunk_size = n > 0``):

1. the student runs once, up to its final hidden states ``(B, C, H)`` (:func:`student_completion_hidden`);
2. the real completion tokens are laid out flat (padding is skipped) and cut into chunks of ``n`` tokens;
3. a statistics pass without gradients computes each chunk's sampled-token log-probs and exact KL (the advantages
   and the token sparsification need the whole batch's values before any loss);
4. per chunk, the output layer, log-softmax, the teacher's log-probs of those tokens and the objective run inside
   :func:`torch.utils.checkpoint.checkpoint`: the forward keeps only the chunk's hidden states, and the backward
   recomputes one chunk's vocabulary-sized tensors at a time.

Every objective is a masked mean over tokens (:attr:`~lockedopd.opd.objective_registry.Objective.token_mean`), so
the chunk losses, each weighted by its share of the kept tokens, sum to the unchunked loss; values and gradients
equal the unchunked ones up to float rounding (tested to 1e-6). Teachers built with ``keep_hidden_states=True``
hand over :class:`~lockedopd.teachers.base.HiddenStateLogprobs`, whose log-probs are likewise made per chunk.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lockedopd.opd import objectives as obj
from lockedopd.opd.config import ObjectiveConfig
from lockedopd.opd.loss import (
    LossOutput,
    check_completions_match,
    check_same_vocabulary,
    compute_opd_loss,
    kept_tokens_and_reward_advantages,
    mixed_advantages,
    with_reward_loss,
)
from lockedopd.opd.objective_registry import ObjectiveInputs, get_objective
from lockedopd.opd.rollout import Rollout, position_ids_from_mask, student_completion_logprobs
from lockedopd.teachers.base import TeacherScores, check_plain_output_layer


def student_completion_hidden(model: nn.Module, rollout: Rollout) -> tuple[torch.Tensor, nn.Module]:
    """The student's final hidden states at the completion positions, with grad, and its output layer.

    Returns ``(hidden, output_layer)``: ``hidden`` is ``(B, C, H)`` where position ``j`` predicts completion token
    ``j`` (the rows :func:`~lockedopd.opd.rollout.student_completion_logprobs` turns into logits), and
    ``output_layer(hidden)`` gives those logits. Works for a plain causal LM and for a PEFT-wrapped one (adapter
    layers inside the decoder or on the output layer are used).
    """
    check_plain_output_layer(getattr(model, "config", None), "objective.chunk_size > 0")
    decoder, output_layer = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or output_layer is None:
        raise ValueError(
            f"objective.chunk_size > 0 needs a causal LM with get_decoder() and get_output_embeddings(); "
            f"{type(model).__name__} has no {'decoder' if decoder is None else 'output layer'}: set chunk_size=0."
        )
    device = next(model.parameters()).device
    completion, width = rollout.completion_ids.shape[1], rollout.input_ids.shape[1]
    out = decoder(
        input_ids=rollout.input_ids.to(device),
        attention_mask=rollout.attention_mask.to(device),
        position_ids=position_ids_from_mask(rollout.attention_mask).to(device),
        use_cache=False,
    )
    return out.last_hidden_state[:, width - completion - 1 : width - 1], output_layer


def token_chunks(num_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` spans of ``chunk_size`` tokens covering ``num_tokens`` (the last one may be shorter)."""
    if chunk_size < 1:
        raise ValueError(f"token_chunks: chunk_size must be >= 1, got {chunk_size}.")
    return [(s, min(s + chunk_size, num_tokens)) for s in range(0, num_tokens, chunk_size)]


def teacher_full_logprobs_reader(
    scores: TeacherScores, rows: torch.Tensor, cols: torch.Tensor, device: torch.device
) -> Callable[[int, int], torch.Tensor] | None:
    """A function ``(start, end) → (end − start, V)`` of the teacher's full log-probs at the flat tokens
    ``rows[start:end], cols[start:end]``, made from dense log-probs or from hidden states; ``None`` without them."""
    if scores.full_hidden is not None:
        source = scores.full_hidden
        hidden_rows, hidden_cols = rows.to(source.hidden.device), cols.to(source.hidden.device)
        return lambda s, e: source.logprobs_of(source.hidden[hidden_rows[s:e], hidden_cols[s:e]]).to(device)
    if scores.full_logprobs is not None:
        dense = scores.full_logprobs
        dense_rows, dense_cols = rows.to(dense.device), cols.to(dense.device)
        return lambda s, e: dense[dense_rows[s:e], dense_cols[s:e]].to(device)
    return None


def _token_statistics(
    flat_hidden: torch.Tensor,
    output_layer: nn.Module,
    flat_ids: torch.Tensor,
    teacher_lp: Callable[[int, int], torch.Tensor] | None,
    rows: torch.Tensor,
    cols: torch.Tensor,
    shape: torch.Size,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sampled-token student log-probs and exact reverse KL laid out ``shape`` (zeros off the flat tokens), one
    chunk of tokens at a time, without gradients."""
    device = flat_hidden.device
    student_tok = torch.zeros(shape, device=device)
    exact_kl = None if teacher_lp is None else torch.zeros(shape, device=device)
    with torch.no_grad():
        for s, e in token_chunks(rows.numel(), chunk_size):
            lp = torch.log_softmax(output_layer(flat_hidden[s:e]).float(), dim=-1)
            student_tok[rows[s:e], cols[s:e]] = obj.gather_token_logprobs(lp, flat_ids[s:e])
            if exact_kl is not None:
                exact_kl[rows[s:e], cols[s:e]] = obj.reverse_kl_per_token(lp, teacher_lp(s, e))
    return student_tok, exact_kl


@torch.no_grad()
def completion_kl_statistics(
    model: nn.Module, rollout: Rollout, scores: TeacherScores, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per completion token, ``chunk_size`` tokens at a time and without gradients: the student's log-prob of the
    sampled token and the exact reverse KL(π_S ‖ π_T) (``None`` when ``scores`` lack the full distribution).

    Returns two ``(B, C)`` tensors, zero on padding: what held-out evaluation needs, with no ``(B, C, V)`` tensor.
    """
    hidden, output_layer = student_completion_hidden(model, rollout)
    mask = scores.mask.to(hidden.device)
    rows, cols = mask.nonzero(as_tuple=True)
    flat_ids = rollout.completion_ids.to(hidden.device)[rows, cols]
    teacher_lp = teacher_full_logprobs_reader(scores, rows, cols, hidden.device)
    return _token_statistics(
        hidden[rows, cols], output_layer, flat_ids, teacher_lp, rows, cols, mask.shape, chunk_size
    )


def rollout_opd_loss(
    model: nn.Module,
    rollout: Rollout,
    scores: TeacherScores,
    config: ObjectiveConfig,
    rewards: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    group_ids: torch.Tensor | None = None,
) -> LossOutput:
    """The OPD loss of one scored rollout of ``model`` (arguments as :func:`~lockedopd.opd.loss.compute_opd_loss`'s,
    with the student's log-probs made here from ``model``): unchunked when ``config.chunk_size == 0`` (the default:
    :func:`~lockedopd.opd.rollout.student_completion_logprobs` then ``compute_opd_loss``), else ``config.chunk_size``
    tokens at a time, with the same value, gradient and statistics (the module docstring says how).
    """
    if config.chunk_size == 0:
        student_lp = student_completion_logprobs(model, rollout)
        extras = {"rewards": rewards, "generator": generator, "group_ids": group_ids}
        return compute_opd_loss(student_lp, rollout.completion_ids, scores, config, **extras)
    objective = get_objective(config.name)
    objective.check_scores(scores)
    if not objective.token_mean:
        raise ValueError(
            f"objective {config.name!r} is not registered as a mean over tokens (token_mean=False), so it cannot be "
            "computed in chunks; set objective.chunk_size=0."
        )
    hidden, output_layer = student_completion_hidden(model, rollout)
    device = hidden.device
    mask = scores.mask.to(device)
    check_completions_match("student completions", tuple(hidden.shape[:2]), mask)
    full_vocab = scores.full_hidden.output_weight.shape[0] if scores.full_hidden is not None else None
    full_vocab = scores.full_logprobs.shape[-1] if scores.full_logprobs is not None else full_vocab
    check_same_vocabulary(full_vocab, output_layer.weight.shape[0])
    completion_ids = rollout.completion_ids.to(device)
    rows, cols = mask.nonzero(as_tuple=True)
    flat_hidden, flat_ids = hidden[rows, cols], completion_ids[rows, cols]
    spans = token_chunks(rows.numel(), config.chunk_size)
    teacher_lp = teacher_full_logprobs_reader(scores, rows, cols, device)

    # statistics pass: sampled-token log-probs and exact KL of every token, no graph kept
    student_tok, exact_kl = _token_statistics(
        flat_hidden, output_layer, flat_ids, teacher_lp, rows, cols, mask.shape, config.chunk_size
    )
    teacher_tok = scores.token_logprobs.to(device)
    advantages = obj.opd_advantages(student_tok, teacher_tok)
    sampled_kl = -advantages
    keep, reward_adv = kept_tokens_and_reward_advantages(
        exact_kl, sampled_kl, mask, config, rewards, generator, group_ids
    )
    adv = mixed_advantages(advantages, reward_adv, objective.reward_in_advantage, config)
    reward_tokens = None
    if reward_adv is not None and not objective.reward_in_advantage:
        reward_tokens = reward_adv.unsqueeze(-1).expand_as(mask)[rows, cols]

    flat = {
        "ids": flat_ids,
        "keep": keep[rows, cols],
        "adv": adv[rows, cols],
        "teacher_tok": teacher_tok[rows, cols],
        "topk_ids": None if scores.topk_ids is None else scores.topk_ids.to(device)[rows, cols],
        "topk_lp": None if scores.topk_logprobs is None else scores.topk_logprobs.to(device)[rows, cols],
        "reward_tokens": reward_tokens,
    }
    chunk_loss = functools.partial(_chunk_loss, objective, config, output_layer, flat, teacher_lp,
                                   flat["keep"].sum().to(torch.float32))  # fmt: skip

    loss = None
    for s, e in spans:
        if not bool(flat["keep"][s:e].any()):
            continue
        part = checkpoint(chunk_loss, flat_hidden[s:e], s, e, use_reentrant=False)
        loss = part if loss is None else loss + part
    if loss is None:  # no kept token: a zero that still reaches the parameters, as the unchunked masked mean does
        loss = hidden.sum() * 0.0
    return LossOutput.of(loss, sampled_kl, mask, keep, exact_kl, rewards)


def _chunk_loss(objective, config, output_layer, flat: dict, teacher_lp, kept_total: torch.Tensor,
                h: torch.Tensor, s: int, e: int) -> torch.Tensor:  # fmt: skip
    """The objective on tokens ``s:e`` (their hidden states ``h``), weighted by the chunk's share of the kept tokens
    (so the chunks sum to the loss). ``flat`` holds every kept-or-not token's ids, keep mask, advantage, teacher
    log-probs and reward term, flattened in the order of ``h``."""

    def one(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[s:e].unsqueeze(0)  # (1, n, ...): the objectives' (B, T) layout

    lp = torch.log_softmax(output_layer(h).float(), dim=-1).unsqueeze(0)
    tok = obj.gather_token_logprobs(lp, one(flat["ids"]))
    chunk_keep = one(flat["keep"])
    inputs = ObjectiveInputs(
        student_logprobs=lp,
        student_token_logprobs=tok,
        completion_ids=one(flat["ids"]),
        teacher_token_logprobs=one(flat["teacher_tok"]),
        teacher_topk_ids=one(flat["topk_ids"]),
        teacher_topk_logprobs=one(flat["topk_lp"]),
        teacher_full_logprobs=teacher_lp(s, e).unsqueeze(0) if objective.needs_full_logprobs else None,
        advantages=one(flat["adv"]),
        mask=chunk_keep,
        config=config,
    )
    loss = with_reward_loss(objective.loss(inputs), tok, one(flat["reward_tokens"]), chunk_keep, config)
    return loss * (chunk_keep.sum().to(torch.float32) / kept_total)
