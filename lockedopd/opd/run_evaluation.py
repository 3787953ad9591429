"""What an OPD run measures on held-out data at its evaluation steps (:class:`RunEvaluator`).

- the reverse KL to the teacher on the student's own samples of the held-out prompts (mean over
  ``eval_sampling_seeds`` sampling seeds), and with ``eval_fixed_text`` the KL on the teacher's greedy completions;
- without a teacher (``objective.name: sft``): the NLL of the held-out records' given completions;
- with ``accuracy.verifier``: task accuracy, greedy and the mean over ``accuracy.samples`` samples
  (:func:`lockedopd.opd.accuracy.evaluate_accuracy`).

Every draw is seeded from the run's seed (:mod:`lockedopd.opd.seeds`), so every evaluation of a run, and every run
of that seed, sees the same samples.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lockedopd.data import PromptRecord
from lockedopd.opd.accuracy import AccuracyResult, evaluate_accuracy
from lockedopd.opd.evaluation import (
    EvalResult,
    evaluate_fixed_text_kl,
    evaluate_reverse_kl_seeds,
    load_or_make_fixed_text,
)
from lockedopd.opd.rollout import (
    encode_completions,
    encode_prompts,
    rollout_from_completions,
    student_completion_logprobs,
)
from lockedopd.opd.seeds import ACCURACY_SEED_OFFSET, EVAL_SEED_OFFSET, step_seed
from lockedopd.tasks.rewards import resolve_reward_fn
from lockedopd.teachers.base import TeacherScorer

__all__ = ["RunEvaluator"]


class RunEvaluator:
    """The held-out metrics of one run's student.

    Args:
        config: the run's :class:`lockedopd.OPDConfig`.
        tokenizer: the student's tokenizer.
        eval_prompts: held-out records (prompts; with ``completion`` for a run without a teacher).
        accuracy_problems: records with an ``answer`` for task accuracy (empty = none measured).
        teacher: scores the held-out KL (``None`` for an objective without a teacher).
        needs_teacher: whether the run's objective has a teacher (else the held-out metric is the completions' NLL).
        run_dir: the run directory (the default place of the fixed-text cache).
    """

    def __init__(
        self,
        config: Any,
        tokenizer: Any,
        eval_prompts: Sequence[PromptRecord],
        accuracy_problems: Sequence[PromptRecord],
        teacher: TeacherScorer | None,
        needs_teacher: bool,
        run_dir: Path,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.teacher = teacher
        self.needs_teacher = needs_teacher
        self.run_dir = Path(run_dir)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        encode = self._encode
        self.eval_prompts = list(eval_prompts)
        self.eval_ids = encode(self.eval_prompts)
        self.accuracy_problems = list(accuracy_problems)
        self.accuracy_ids = encode(self.accuracy_problems) if self.accuracy_problems else []
        self.eval_completions: list[tuple[list[int], list[int]]] = []  # (prompt, completion): the NLL's data
        if not needs_teacher:
            held = [(ids, r.completion) for ids, r in zip(self.eval_ids, self.eval_prompts) if r.completion]
            if self.eval_prompts and not held:
                raise ValueError(
                    f'objective.name={config.objective.name}: no held-out record has a "completion" to score; give '
                    "data.eval_path records with completions (or data.eval_size=0)."
                )
            completions = encode_completions(tokenizer, [text for _, text in held]) if held else []
            self.eval_completions = [(ids, c) for (ids, _), c in zip(held, completions)]
        self._fixed_text = None

    def _encode(self, records: Sequence[PromptRecord]) -> list[list[int]]:
        c = self.config
        return encode_prompts(self.tokenizer, [r.prompt for r in records], c.data.use_chat_template,
                              c.rollout.max_prompt_tokens)  # fmt: skip

    @property
    def active(self) -> bool:
        """Whether there is anything to evaluate (held-out prompts or accuracy problems)."""
        return bool(self.eval_ids or self.accuracy_problems)

    def metrics(self, model: nn.Module, sampler: Any = None, accuracy: bool = True) -> dict[str, Any]:
        """Every held-out metric of ``model``, flat, as metrics.jsonl records them: the KLs of :meth:`reverse_kl` (or,
        without a teacher, ``eval_nll``) and, when ``accuracy`` and there are problems, the task accuracy."""
        metrics: dict[str, Any] = {}
        if self.eval_ids:
            if self.needs_teacher:
                metrics.update(self.reverse_kl(model, sampler).as_dict())
            else:
                metrics["eval_nll"] = self.completion_nll(model)
        if self.accuracy_problems and accuracy:
            metrics.update(self.accuracy(model).as_dict())
        return metrics

    def accuracy(self, model: nn.Module) -> AccuracyResult:
        """Task accuracy on the accuracy problems: greedy exact match and the mean over ``accuracy.samples`` samples
        per problem, seeded from the run's seed (the same seeds at every evaluation and in every run of that seed)."""
        c, acc = self.config, self.config.accuracy
        return evaluate_accuracy(
            model,
            self.tokenizer,
            self.accuracy_ids,
            [r.answer for r in self.accuracy_problems],
            resolve_reward_fn(acc.verifier),
            acc.max_new_tokens or c.rollout.max_new_tokens,
            batch_size=acc.batch_size,
            samples=acc.samples,
            temperature=acc.temperature,
            seed=step_seed(c.seed + ACCURACY_SEED_OFFSET, 0),
        )

    @torch.no_grad()
    def completion_nll(self, model: nn.Module) -> float:
        """Mean per-token NLL of the held-out records' given completions (what a supervised run is trained on)."""
        ids = [prompt for prompt, _ in self.eval_completions]
        completions = [completion for _, completion in self.eval_completions]
        was_training = model.training
        model.eval()
        total, tokens = 0.0, 0
        batch = self.config.batch_size
        for start in range(0, len(ids), batch):
            rollout = rollout_from_completions(
                ids[start : start + batch], completions[start : start + batch], None, self.pad_token_id,
                self.eos_token_id,
            )  # fmt: skip
            token_lp = student_completion_logprobs(model, rollout)
            token_lp = token_lp.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1).cpu()
            total -= float((token_lp * rollout.completion_mask).sum())
            tokens += rollout.num_tokens
        model.train(was_training)
        return total / max(tokens, 1)

    def reverse_kl(self, model: nn.Module, sampler: Any = None) -> EvalResult:
        """Held-out KLs of ``model`` (``sampler``: the vLLM student sampler, if the run samples with one).

        The reverse KL on the student's own samples is the mean over ``eval_sampling_seeds`` sampling seeds, seed i
        being ``step_seed(seed + EVAL_SEED_OFFSET, i)``: the same seeds at every evaluation, seed 0 the one a
        single-seed run uses. With ``eval_fixed_text`` it adds KL on the teacher's greedy completions of the held-out
        prompts (made once, cached at ``eval_fixed_text_path`` or ``output_dir/fixed_text.json``).
        """
        c = self.config
        result = evaluate_reverse_kl_seeds(
            model,
            self.teacher,
            self.eval_ids,
            self.pad_token_id,
            self.eos_token_id,
            c.rollout.max_new_tokens,
            c.batch_size,
            seeds=[step_seed(c.seed + EVAL_SEED_OFFSET, i) for i in range(c.eval_sampling_seeds)],
            temperature=c.rollout.temperature,
            exact=bool(self.teacher.returns_full_logprobs),
            sampler=sampler,
            chunk_size=c.objective.chunk_size,
        )
        if c.eval_fixed_text:
            if self._fixed_text is None:
                path = Path(c.eval_fixed_text_path) if c.eval_fixed_text_path else self.run_dir / "fixed_text.json"
                self._fixed_text = load_or_make_fixed_text(
                    path,
                    self.teacher,
                    self.eval_ids,
                    self.eos_token_id,
                    c.rollout.max_new_tokens,
                    c.batch_size,
                    teacher_description=json.dumps(dataclasses.asdict(c.teacher.model), sort_keys=True),
                )
            result.fixed_text = evaluate_fixed_text_kl(
                model, self.teacher, self._fixed_text, self.pad_token_id, self.eos_token_id, c.batch_size
            )
        return result
