"""Task accuracy of a causal LM on problems with reference answers, judged by a verifier.

Two numbers, as the distillation literature reports them: **greedy exact match** (one greedy completion per
problem, scored by the verifier) and **mean accuracy over k samples** at a temperature (each problem sampled k
times; the mean of the k·N scores). Sampling is seeded per row (:class:`~lockedopd.opd.rollout.PerRowSampling`), so
a problem's samples depend only on the model, the problem and the seed, never on the batch it shares: the same
model gives the same accuracy twice under the same seed, at any batch size.

The verifier is any :data:`lockedopd.tasks.rewards.RewardFn` (a task's ``verify``, ``contains_answer``, or
``"module:function"``): the same interface that gives verifiable rewards in training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LogitsProcessorList

from lockedopd.opd.rollout import PerRowSampling, mask_after_eos
from lockedopd.tasks.rewards import RewardFn

#: Completions for the evaluator: ``(prompts, seeds, temperature, max_new_tokens) -> (texts, token_counts)``, greedy
#: when ``seeds`` is ``None``, else row r sampled from its own stream ``seeds[r]`` (an HF model's ``generate`` by
#: default; :class:`lockedopd.opd.vllm_generation.VLLMTextGenerator` on a vLLM engine).
TextGenerator = Callable[[list[list[int]], "list[int] | None", float, int], tuple[list[str], list[int]]]


@dataclass
class AccuracyResult:
    """Accuracy on ``problems`` problems.

    Attributes:
        greedy: share of problems whose greedy completion the verifier accepts.
        sampled: mean verifier score over ``samples`` samples per problem at the sampling temperature (``None`` when
            ``samples == 0``).
        samples: samples per problem behind ``sampled``.
        problems: problems scored.
        mean_completion_tokens: mean length of the greedy completions (EOS included).
        greedy_correct: per problem, whether its greedy completion was accepted (in problem order).
    """

    greedy: float
    sampled: float | None
    samples: int
    problems: int
    mean_completion_tokens: float
    greedy_correct: list[bool]

    def as_dict(self, prefix: str = "eval_") -> dict:
        """Flat dict for metrics.jsonl (``eval_accuracy`` is the greedy exact match)."""
        out = {
            f"{prefix}accuracy": self.greedy,
            f"{prefix}accuracy_problems": self.problems,
            f"{prefix}accuracy_completion_tokens": self.mean_completion_tokens,
        }
        if self.sampled is not None:
            out[f"{prefix}accuracy_sampled"] = self.sampled
            out[f"{prefix}accuracy_samples"] = self.samples
        return out


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module | None,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    answers: Sequence[str],
    verifier: RewardFn,
    max_new_tokens: int,
    batch_size: int = 64,
    samples: int = 4,
    temperature: float = 1.0,
    seed: int = 0,
    generator: TextGenerator | None = None,
) -> AccuracyResult:
    """Greedy exact match and mean accuracy over ``samples`` samples per problem.

    Args:
        model: the causal LM (a PEFT-wrapped one too); evaluated in eval mode, its mode restored (``None`` when a
            ``generator`` writes the completions).
        tokenizer: decodes completions for the verifier.
        prompt_ids: N prompts (token ids, chat template applied as in training).
        answers: N reference answers.
        verifier: scores decoded completions against the answers (1.0 = correct).
        max_new_tokens: the longest completion.
        batch_size: rows per ``generate`` call.
        samples: samples per problem at ``temperature`` (0 = greedy only).
        temperature: the sampling temperature.
        seed: sample j of problem i draws from the stream seeded ``seed + j * N + i``.
        generator: writes the completions instead of ``model.generate`` (e.g. a vLLM engine).
    """
    if not prompt_ids:
        raise ValueError("evaluate_accuracy: no problems to evaluate; give prompts that carry an answer.")
    if len(prompt_ids) != len(answers):
        raise ValueError(f"evaluate_accuracy: {len(prompt_ids)} prompts but {len(answers)} answers.")
    if samples < 0 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"evaluate_accuracy: samples must be >= 0, batch_size and max_new_tokens >= 1 (got {samples}, "
            f"{batch_size}, {max_new_tokens})."
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    if generator is None:
        if model is None:
            raise ValueError("evaluate_accuracy: give the model, or a generator that writes the completions.")

        def generator(prompts, seeds, temperature, max_new):
            return _generate_texts(model, tokenizer, prompts, pad, eos, max_new, seeds, temperature)

    n = len(prompt_ids)
    correct: list[bool] = []
    tokens = 0
    for start in range(0, n, batch_size):
        chunk = list(prompt_ids[start : start + batch_size])
        texts, lengths = generator(chunk, None, temperature, max_new_tokens)
        scores = verifier(texts, list(answers[start : start + batch_size]))
        correct.extend(float(s) >= 1.0 for s in scores)
        tokens += sum(lengths)
    sampled = None
    if samples > 0:
        rows = [(j * n + i, i) for j in range(samples) for i in range(n)]  # sample j of problem i: stream seed + k
        total = 0.0
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            prompts = [list(prompt_ids[i]) for _, i in chunk]
            seeds = [seed + k for k, _ in chunk]
            texts, _ = generator(prompts, seeds, temperature, max_new_tokens)
            total += float(sum(float(s) for s in verifier(texts, [answers[i] for _, i in chunk])))
        sampled = total / len(rows)
    return AccuracyResult(
        greedy=sum(correct) / n,
        sampled=sampled,
        samples=samples,
        problems=n,
        mean_completion_tokens=tokens / n,
        greedy_correct=correct,
    )


def _generate_texts(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    pad: int,
    eos,
    max_new_tokens: int,
    seeds: list[int] | None,
    temperature: float,
) -> tuple[list[str], list[int]]:
    """Decoded completions (to the first EOS) and their token counts: greedy when ``seeds`` is None, else row r
    sampled from its own stream ``seeds[r]`` (:class:`~lockedopd.opd.rollout.PerRowSampling`). Unlike a training
    rollout nothing but the tokens is kept (no per-step logits), which is what makes scoring hundreds of problems
    affordable."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    extra = {}
    if seeds is not None:  # row r's sample depends only on its logits and seeds[r], never on the batch
        extra["logits_processor"] = LogitsProcessorList([PerRowSampling(seeds, width, temperature)])
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=eos,
        **extra,
    )
    model.train(was_training)
    completions = out[:, width:].cpu()
    mask = mask_after_eos(completions, eos)
    rows = [ids[keep].tolist() for ids, keep in zip(completions, mask)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True), [len(r) for r in rows]
