"""The OPD training loop: rollout → teacher scores → objective → backward → optimizer step.

Phases (``phase`` in metrics.jsonl): ``full`` (plain OPD, no lock configured), ``warmup`` (full parameters while
the subspace tracker watches ΔW) and ``locked`` (only the coefficients of the SubspaceLockedAdapter train).

Under ``torchrun`` / ``accelerate launch`` the loop runs data-parallel (:mod:`lockedopd.distributed`): each process
samples and scores its contiguous share of every micro-batch of ``batch_size`` prompts, weights its loss by its share
of the micro-batch's loss tokens, and the gradients are summed over processes, so the step is the one a single
process takes on the whole micro-batch. Only the main process evaluates and writes the run directory. With
``fsdp: true`` the student is sharded over the processes instead of replicated (:mod:`lockedopd.fsdp`): rollouts and
the main process's evaluation run on the gathered weights, FSDP2 sums the gradients, checkpoints are gathered whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lockedopd.activation_checkpointing import enable_activation_checkpointing
from lockedopd.atomic_io import atomic_write_text, recover_interrupted_writes
from lockedopd.checkpoint import checkpoint_dir, list_checkpoints, load_checkpoint, save_checkpoint
from lockedopd.data import PromptRecord
from lockedopd.distributed import DistContext, init_distributed
from lockedopd.host_allocator import set_malloc_mmap_threshold
from lockedopd.opd.accuracy import AccuracyResult, evaluate_accuracy
from lockedopd.opd.chunked_loss import rollout_opd_loss
from lockedopd.opd.config import RESUMABLE_CHANGES, OPDConfig, config_changes, config_to_dict
from lockedopd.opd.evaluation import (
    EvalResult,
    evaluate_fixed_text_kl,
    evaluate_reverse_kl_seeds,
    load_or_make_fixed_text,
)
from lockedopd.opd.loss import teacher_request
from lockedopd.opd.objective_registry import get_objective
from lockedopd.opd.rollout import (
    HFStudentSampler,
    Rollout,
    encode_completions,
    encode_prompts,
    rollout_from_completions,
    student_completion_logprobs,
)
from lockedopd.opd.schedule import lr_at_step
from lockedopd.params import (
    build_adamw,
    freeze_all_but,
    optimizer_state_bytes,
    select_target_linears,
    trainable_parameters,
)
from lockedopd.phases import ADAPTER_NAME
from lockedopd.rewards import resolve_reward_fn
from lockedopd.teachers.base import TeacherScorer, TeacherScores

logger = logging.getLogger(__name__)
EVAL_SEED_OFFSET = 1_000_003
ACCURACY_SEED_OFFSET = 2_000_029


def step_seed(seed: int, step: int, micro: int = 0) -> int:
    """The seed of one micro-batch: a pure function of (run seed, step), so a resumed run draws the same."""
    return (seed * 1_000_033 + step * 7_919 + micro * 104_729) % (2**31 - 1)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per step, appended and flushed to disk as each step ends.

    On resume the entries after the resumed step are dropped (they are recomputed), and a torn last line — what a
    kill in the middle of an append leaves — is dropped with a warning. A damaged line elsewhere is refused: the
    log is not ours to guess at.
    """

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            atomic_write_text(path, "")
        else:
            kept = [line for line, record in self._parse() if record.get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def _parse(self) -> list[tuple[str, dict[str, Any]]]:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        parsed = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                parsed.append((line, json.loads(line)))
            except json.JSONDecodeError as exc:
                if number == len(lines):
                    logger.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run", self.path,
                                   len(line))  # fmt: skip
                    continue
                raise ValueError(
                    f"{self.path} line {number} is not JSON ({exc.msg}); the log is damaged before its last line: "
                    "restore it, or start the run again in a new output_dir."
                ) from exc
        return parsed

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to disk."""
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        """All records so far."""
        return [record for _, record in self._parse()]


class OPDTrainer:
    """On-policy distillation of ``student`` towards ``teacher``, with optional warmup → subspace lock.

    Args:
        config: the run's :class:`OPDConfig`.
        student: a causal LM (trained in place).
        tokenizer: the student's tokenizer (shared with the teacher).
        teacher: any :class:`lockedopd.teachers.TeacherScorer`; ``None`` for objectives that need no teacher
            (``sft``, which trains on each record's given completion).
        train_prompts / eval_prompts: prompt records.
        eval_teacher: scores held-out evaluation instead of ``teacher`` (e.g. an in-process copy for the exact
            full-vocabulary KL while a vLLM teacher scores training); ``None`` = ``teacher``.
        dist: this process's place in a multi-process run; ``None`` = :func:`lockedopd.distributed.init_distributed`
            (one process unless launched by ``torchrun`` / ``accelerate launch``).
        accuracy_problems: problems with answers whose task accuracy every evaluation measures (with
            ``accuracy.verifier``; see :mod:`lockedopd.opd.accuracy`).

    Use :meth:`from_config` to build everything from a config, then :meth:`train`.
    """

    def __init__(
        self,
        config: OPDConfig,
        student: nn.Module,
        tokenizer,
        teacher: TeacherScorer | None,
        train_prompts: Sequence[PromptRecord],
        eval_prompts: Sequence[PromptRecord],
        eval_teacher: TeacherScorer | None = None,
        dist: DistContext | None = None,
        accuracy_problems: Sequence[PromptRecord] | None = None,
    ) -> None:
        if not train_prompts:
            raise ValueError("OPDTrainer: the training prompt set is empty; give data.train_path with prompts.")
        self.objective = get_objective(config.objective.name)
        if teacher is None and self.objective.needs_teacher:
            raise ValueError(
                f"OPDTrainer: objective.name={config.objective.name} scores the student against a teacher, but none "
                "was given; pass a TeacherScorer (or build everything with OPDTrainer.from_config)."
            )
        if config.malloc_mmap_threshold:
            set_malloc_mmap_threshold(config.malloc_mmap_threshold)
        self.dist = dist if dist is not None else init_distributed()
        config = _fsdp_from_launcher(config)
        _check_world_size(config, self.dist)
        self.fsdp = config.fsdp
        self.dist.broadcast_parameters(student)  # every process starts from the main process's weights
        self.config = config
        self.model = student
        self.base_model = student
        self.tokenizer = tokenizer
        self.teacher = teacher
        self.eval_teacher = eval_teacher if eval_teacher is not None else teacher
        self.train_prompts = list(train_prompts)
        self.eval_prompts = list(eval_prompts)
        self.run_dir = Path(config.output_dir)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        max_prompt = config.rollout.max_prompt_tokens
        use_template = config.data.use_chat_template
        self.train_ids = encode_prompts(tokenizer, [r.prompt for r in self.train_prompts], use_template, max_prompt)
        self.eval_ids = encode_prompts(tokenizer, [r.prompt for r in self.eval_prompts], use_template, max_prompt)
        self.train_completion_ids = None  # the given completions an objective without a teacher trains on
        self.eval_completions: list[tuple[list[int], list[int]]] = []  # (prompt, completion) its evaluation scores
        if not self.objective.needs_teacher:
            self.train_completion_ids = encode_completions(tokenizer, [r.completion for r in self.train_prompts])
            held = [(ids, r.completion) for ids, r in zip(self.eval_ids, self.eval_prompts) if r.completion]
            if self.eval_prompts and not held:
                raise ValueError(
                    f'objective.name={config.objective.name}: no held-out record has a "completion" to score; give '
                    "data.eval_path records with completions (or data.eval_size=0)."
                )
            completions = encode_completions(tokenizer, [text for _, text in held]) if held else []
            self.eval_completions = [(ids, c) for (ids, _), c in zip(held, completions)]
        self.accuracy_problems = list(accuracy_problems or [])
        self.accuracy_ids = encode_prompts(
            tokenizer, [r.prompt for r in self.accuracy_problems], use_template, max_prompt
        ) if self.accuracy_problems else []  # fmt: skip
        self.reward_fn = resolve_reward_fn(config.objective.reward_fn) if config.objective.reward_fn else None
        self.request = teacher_request(config.objective)
        self.phase = "warmup" if config.lock.enabled else "full"
        self.lock = None
        self.sampler = None  # vLLM student sampler (rollout.backend=vllm), started by train()
        self._sampler_base = None  # which base weights the sampler holds: (phase, lock step)
        self.step = 0
        if config.gradient_checkpointing:
            enable_activation_checkpointing(student)
        targets = self.target_parameters()
        params, betas = freeze_all_but(student, targets.values()), (config.adam_beta1, config.adam_beta2)
        if self.fsdp:  # shard before the optimizer is built: it then holds the shards and their state
            from lockedopd.fsdp import fully_shard_layers

            fully_shard_layers(student, sum_gradients=True)
            targets = self.target_parameters()
            params = list(targets.values())
        if config.optimizer == "galore":
            from lockedopd.optim.galore import build_galore_adamw

            g = config.galore
            self.optimizer = build_galore_adamw(
                params, config.lr, g.rank or config.lock.rank, g.update_proj_gap, g.scale, g.proj_type, betas,
                config.adam_eps, config.weight_decay,
            )  # fmt: skip
        elif config.optimizer == "factored":
            from lockedopd.optim.factored_full import FactoredAdamW

            self.optimizer = FactoredAdamW(params, config.lr, betas, config.adam_eps, config.weight_decay)
        elif config.optimizer == "adamw8bit":
            from lockedopd.quantization import build_adamw8bit

            self.optimizer = build_adamw8bit(params, config.lr, betas, config.adam_eps, config.weight_decay)
        else:
            self.optimizer = build_adamw(params, config.lr, betas, config.adam_eps, config.weight_decay)
        if config.lock.enabled:
            from lockedopd.opd.locking import LockController

            self.lock = LockController(config, self.run_dir, student, list(targets), self.lr_at, dist=self.dist)

    # ----------------------------------------------------------------------------------------------- set-up
    @classmethod
    def from_config(cls, config: OPDConfig) -> OPDTrainer:
        """Build student, teacher and prompts from ``config`` (all checked before anything is written)."""
        from lockedopd.opd.builders import build_run_inputs

        torch.manual_seed(config.seed)
        inputs = build_run_inputs(config)
        return cls(
            config,
            inputs.student,
            inputs.tokenizer,
            inputs.teacher,
            inputs.train_prompts,
            inputs.eval_prompts,
            eval_teacher=inputs.eval_teacher,
            accuracy_problems=inputs.accuracy_problems,
        )

    def target_parameters(self) -> dict[str, nn.Parameter]:
        """Weights of the student's target Linear modules, keyed by module name."""
        linears = select_target_linears(self.base_model, self.config.target_modules)
        return {name: module.weight for name, module in linears.items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the current phase trains."""
        return trainable_parameters(self.optimizer)

    def apply_phase_change(self, change) -> None:
        """Switch to the model, optimizer and phase a lock, unlock or relock hands over (a ``PhaseChange``)."""
        self.model, self.base_model = change.model, change.base_model
        self.optimizer, self.phase = change.optimizer, change.phase

    # ---------------------------------------------------------------------------------------------- training
    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        c = self.config
        return lr_at_step(step, c.lr, c.max_steps, c.lr_scheduler, c.lr_warmup_steps, c.min_lr_ratio)

    def _sample_prompts(self, step: int, micro: int) -> list[int]:
        """Indices of the micro-batch's training records (a pure function of seed, step and micro-batch)."""
        rng = random.Random(step_seed(self.config.seed, step, micro))
        return [rng.randrange(len(self.train_ids)) for _ in range(self.config.batch_size)]

    def training_step(self, step: int) -> dict[str, Any]:
        """One optimizer step (``grad_accum_steps`` micro-batches); returns its metrics."""
        c = self.config
        started = time.perf_counter()
        rollout_s = score_s = 0.0
        totals = {"loss": 0.0, "reverse_kl": 0.0, "tokens": 0, "kept_tokens": 0}
        exact, rewards_seen, gather_s = [], [], 0.0
        if self.lock is not None:
            self.lock.before_backward(step)
        self.model.train()
        for micro in range(c.grad_accum_steps):
            seed = step_seed(c.seed, step, micro)
            picks = self._sample_prompts(step, micro)
            offset = 0  # global index of this process's first prompt: row i samples with seed + offset + i
            if self.dist.enabled:
                offset, picks = self.dist.shard(picks)
            prompt_ids, records = [self.train_ids[i] for i in picks], [self.train_prompts[i] for i in picks]
            t0 = time.perf_counter()
            if self.objective.needs_teacher:
                rollout, seconds = self._sample_rollout(prompt_ids, seed + offset)
                gather_s += seconds
                t1 = time.perf_counter()
                scores = self.teacher.score(rollout.sequences(), rollout.prompt_lengths, **self.request)
            else:  # supervised: the data's completions, scored by nobody
                completions = [self.train_completion_ids[i] for i in picks]
                rollout = rollout_from_completions(prompt_ids, completions, None, self.pad_token_id, self.eos_token_id)
                t1 = time.perf_counter()
                scores = TeacherScores(torch.zeros(rollout.completion_ids.shape), rollout.completion_mask)
            t2 = time.perf_counter()
            rollout_s, score_s = rollout_s + t1 - t0, score_s + t2 - t1
            rewards = None
            if self.reward_fn is not None:
                texts = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
                rewards = torch.tensor(self.reward_fn(texts, [r.answer for r in records]), dtype=torch.float32)
            generator = torch.Generator().manual_seed(seed)
            # objective.chunk_size > 0: no (B, C, V) tensor, the loss over checkpointed chunks of tokens
            out = rollout_opd_loss(self.model, rollout, scores, c.objective, rewards, generator)
            if self.dist.enabled:
                out = self._share_of_micro_batch(out, len(prompt_ids))
            (out.loss / c.grad_accum_steps).backward()
            totals["loss"] += float(out.loss.detach()) / c.grad_accum_steps
            totals["reverse_kl"] += out.reverse_kl / c.grad_accum_steps
            totals["tokens"] += out.tokens
            totals["kept_tokens"] += out.kept_tokens
            if out.exact_reverse_kl is not None:
                exact.append(out.exact_reverse_kl)
            if out.reward_mean is not None:
                rewards_seen.append(out.reward_mean)
            del out, scores
        if self.dist.enabled:
            if not self.fsdp:  # (FSDP2 sums the gradients' shards itself, in the backward)
                self.dist.sum_gradients(p for p in self.model.parameters() if p.requires_grad)
            totals["loss"] = self.dist.sum_floats([totals["loss"]])[0]
        params = self.trainable_parameters()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm if c.max_grad_norm > 0 else 1e30))
        if not (math.isfinite(totals["loss"]) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"step {step + 1}: the loss ({totals['loss']}) or the gradient norm ({grad_norm}) is not finite; the "
                "optimizer step was not taken and nothing of the step was written. Lower lr, or check the teacher's "
                "log-probs and the student's dtype."
            )
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # the locked optimizer keeps one scale per matrix
        if self.lock is not None:
            self.lock.before_optimizer_step(step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not self.objective.needs_teacher:  # no teacher: the "KL" against zero teacher log-probs is −NLL
            totals["nll"] = -totals.pop("reverse_kl")
        record = {"step": step + 1, "phase": self.phase, **totals, "lr": lr, "grad_norm": grad_norm}
        if exact:
            record["exact_reverse_kl"] = sum(exact) / len(exact)
        if rewards_seen:
            record["reward"] = sum(rewards_seen) / len(rewards_seen)
        record.update(
            trainable_params=sum(p.numel() for p in params),
            optimizer_state_bytes=optimizer_state_bytes(self.optimizer),
            rollout_s=round(rollout_s, 4),
            score_s=round(score_s, 4),
            step_time_s=round(time.perf_counter() - started, 4),
        )
        if self.fsdp:
            record["gather_s"] = round(gather_s, 4)  # the all-gather before the rollouts (part of rollout_s)
        return record

    def _sample_rollout(self, prompt_ids: list[list[int]], seed: int) -> tuple[Rollout, float]:
        """The student's samples of ``prompt_ids`` and the seconds an FSDP gather took (0 without FSDP)."""
        c = self.config
        per_row = c.rollout.seeding == "prompt"
        sampler = self.sampler if self.sampler is not None else HFStudentSampler(self.model, seed_per_row=per_row)
        with self._whole_student() as gathered:  # fsdp: every process gathers, then samples alone
            rollout = sampler.generate(
                prompt_ids,
                self.pad_token_id,
                self.eos_token_id,
                c.rollout.max_new_tokens,
                c.rollout.temperature,
                c.rollout.top_p,
                seed=seed,
            )
            return rollout, gathered()

    @contextlib.contextmanager
    def _whole_student(self):
        """With ``fsdp``: the student gathered whole on every process (a collective; each may then run any number
        of forward passes alone) and resharded after. Yields a function returning the seconds the gather took."""
        if not self.fsdp:
            yield lambda: 0.0
            return
        from lockedopd.fsdp import unsharded

        started = time.perf_counter()
        with unsharded(self.model):
            seconds = time.perf_counter() - started
            yield lambda: seconds

    def _evaluate_on_main(self, accuracy: bool = True) -> dict[str, Any] | None:
        """:meth:`evaluation_metrics` on the main process (``None`` elsewhere); with ``fsdp`` every process must call
        it, to gather the student for the main process's evaluation."""
        with self._whole_student():
            return self.evaluation_metrics(accuracy) if self.dist.is_main else None

    def evaluation_metrics(self, accuracy: bool = True) -> dict[str, Any]:
        """Every held-out metric of the current student, flat, as metrics.jsonl records them: the KLs of
        :meth:`evaluate` (or, without a teacher, the NLL of the held-out completions) and, with
        ``accuracy.verifier`` and ``accuracy`` true, the task accuracy of :meth:`evaluate_accuracy`."""
        metrics: dict[str, Any] = {}
        if self.eval_ids:
            if self.objective.needs_teacher:
                metrics.update(self.evaluate().as_dict())
            else:
                metrics["eval_nll"] = self.evaluate_completion_nll()
        if self.accuracy_problems and accuracy:
            metrics.update(self.evaluate_accuracy().as_dict())
        return metrics

    def evaluate_accuracy(self) -> AccuracyResult:
        """Task accuracy on the accuracy problems: greedy exact match and the mean over ``accuracy.samples`` samples
        per problem, seeded from the run's seed (the same seeds at every evaluation and in every run of that seed)."""
        c, acc = self.config, self.config.accuracy
        return evaluate_accuracy(
            self.model,
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
    def evaluate_completion_nll(self) -> float:
        """Mean per-token NLL of the held-out records' given completions (what a supervised run is trained on)."""
        ids = [prompt for prompt, _ in self.eval_completions]
        completions = [completion for _, completion in self.eval_completions]
        was_training = self.model.training
        self.model.eval()
        total, tokens = 0.0, 0
        for start in range(0, len(ids), self.config.batch_size):
            stop = start + self.config.batch_size
            rollout = rollout_from_completions(
                ids[start:stop], completions[start:stop], None, self.pad_token_id, self.eos_token_id
            )
            token_lp = student_completion_logprobs(self.model, rollout)
            token_lp = token_lp.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1).cpu()
            total -= float((token_lp * rollout.completion_mask).sum())
            tokens += rollout.num_tokens
        self.model.train(was_training)
        return total / max(tokens, 1)

    def _share_of_micro_batch(self, out, prompts: int):
        """This process's part of a micro-batch split over processes, as the loss to back-propagate.

        The objective is a mean over the micro-batch's loss tokens; a process's mean is weighted by its share of
        them (summed gradients then equal the whole micro-batch's). The logged statistics become the micro-batch's:
        token-weighted KLs, summed token counts, the prompt-weighted reward.
        """
        exact = out.exact_reverse_kl
        reward = out.reward_mean
        kept, tokens, kl_sum, exact_sum, reward_sum, rows = self.dist.sum_floats(
            [
                out.kept_tokens,
                out.tokens,
                out.reverse_kl * out.tokens,
                (exact or 0.0) * out.tokens,
                (reward or 0.0) * prompts,
                prompts,
            ]
        )
        return dataclasses.replace(
            out,
            loss=out.loss * (out.kept_tokens / max(kept, 1.0)),
            reverse_kl=kl_sum / max(tokens, 1.0),
            tokens=int(tokens),
            kept_tokens=int(kept),
            exact_reverse_kl=None if exact is None else exact_sum / max(tokens, 1.0),
            reward_mean=None if reward is None else reward_sum / max(rows, 1.0),
        )

    def evaluate(self) -> EvalResult:
        """Held-out metrics of the current student.

        The reverse KL on the student's own samples is the mean over ``eval_sampling_seeds`` sampling seeds, seed i
        being ``step_seed(seed + EVAL_SEED_OFFSET, i)``: the same seeds at every evaluation, seed 0 the one a
        single-seed run uses. With ``eval_fixed_text`` it adds KL on the teacher's greedy completions of the held-out
        prompts (made once, cached at ``eval_fixed_text_path`` or ``output_dir/fixed_text.json``).
        """
        c = self.config
        result = evaluate_reverse_kl_seeds(
            self.model,
            self.eval_teacher,
            self.eval_ids,
            self.pad_token_id,
            self.eos_token_id,
            c.rollout.max_new_tokens,
            c.batch_size,
            seeds=[step_seed(c.seed + EVAL_SEED_OFFSET, i) for i in range(c.eval_sampling_seeds)],
            temperature=c.rollout.temperature,
            exact=self._exact_eval(),
            sampler=self.sampler,
            chunk_size=c.objective.chunk_size,
        )
        if c.eval_fixed_text:
            fixed = getattr(self, "_fixed_text", None)
            if fixed is None:
                path = Path(c.eval_fixed_text_path) if c.eval_fixed_text_path else self.run_dir / "fixed_text.json"
                teacher = json.dumps(dataclasses.asdict(c.teacher.model), sort_keys=True)
                fixed = load_or_make_fixed_text(
                    path,
                    self.eval_teacher,
                    self.eval_ids,
                    self.eos_token_id,
                    c.rollout.max_new_tokens,
                    c.batch_size,
                    teacher_description=teacher,
                )
                self._fixed_text = fixed
            result.fixed_text = evaluate_fixed_text_kl(
                self.model, self.eval_teacher, fixed, self.pad_token_id, self.eos_token_id, c.batch_size
            )
        return result

    @property
    def _evaluates(self) -> bool:
        return bool(self.eval_ids or self.accuracy_problems)

    def _exact_eval(self) -> bool:
        return bool(self.eval_teacher.returns_full_logprobs)

    def train(self) -> dict[str, Any]:
        """Run (or resume) training to ``max_steps``; returns a summary (also written to ``summary.json``)."""
        c = self.config
        main = self.dist.is_main
        resume_from = self._resume_point()
        self.dist.barrier()  # every process has looked at the run directory before the main process writes to it
        log = None  # metrics.jsonl: the main process's
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume_from is None or not (self.run_dir / "config.yaml").is_file():
                atomic_write_text(self.run_dir / "config.yaml", _yaml_dump(config_to_dict(c)))
            log = MetricsLog(self.run_dir / "metrics.jsonl", None if resume_from is None else self.step)
        self.dist.barrier()
        if c.rollout.backend == "vllm" and self.sampler is None:
            self._start_sampler()
        if resume_from is None:
            if self.lock is not None:
                change = self.lock.start(self.base_model, self.optimizer)
                if change is not None:
                    self.apply_phase_change(change)
            initial = self._evaluate_on_main() if self._evaluates and c.eval_at_start else None
            if initial is not None:
                log.write({"step": 0, "phase": self.phase, **initial})
            self.save()
        progress = _progress(c.progress and main, total=c.max_steps, initial=self.step)
        try:
            while self.step < c.max_steps:
                record = self.training_step(self.step)
                self.step += 1
                if self.lock is not None:
                    extra, change = self.lock.after_step(self.step, self.phase, self.base_model, self.optimizer)
                    record.update(extra)
                    if change is not None:
                        self.apply_phase_change(change)
                if self.sampler is not None:
                    record["sync_s"] = round(self._sync_sampler(), 4)
                is_last = self.step == c.max_steps
                every = c.accuracy.eval_steps
                accuracy_due = bool(is_last or record.get("locked_now") or (every and self.step % every == 0))
                kl_due = is_last or (c.eval_steps and self.step % c.eval_steps == 0) or record.get("locked_now")
                if self._evaluates and (kl_due or (accuracy_due and self.accuracy_problems)):
                    result = self._evaluate_on_main(accuracy=accuracy_due)
                    if result is not None:
                        record.update(result)
                if log is not None:
                    log.write(record)
                if is_last or (c.save_steps and self.step % c.save_steps == 0) or record.get("locked_now"):
                    self.save()
                if progress is not None:
                    progress.update(1)
                    shown = {"kl": record["reverse_kl"]} if "reverse_kl" in record else {"nll": record["nll"]}
                    progress.set_postfix(phase=self.phase, **{k: f"{v:.3f}" for k, v in shown.items()},
                                         loss=f"{record['loss']:.3f}")  # fmt: skip
        except Exception as exc:
            self._add_resume_note(exc)
            raise
        finally:
            if progress is not None:
                progress.close()
        summary = None
        adapter_state = self.lock.gathered_adapter_state() if self.fsdp and self.lock is not None else None
        if main:
            summary = self._summary(log.read())
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            from lockedopd.opd.plots import plot_training_curves

            plot_training_curves(log.read(), self.run_dir / "curves.png", lock_step=summary.get("lock_step"))
            if self.lock is not None:
                self.lock.finish(summary, adapter_state)
        return self.dist.broadcast_object(summary)  # every process returns the run's summary

    # --------------------------------------------------------------------------------------- vLLM rollouts
    def _start_sampler(self) -> None:
        """Start the vLLM student sampler from the current (possibly resumed) student."""
        from lockedopd.opd.vllm_rollout import VLLMStudentSampler

        c = self.config
        locked = self.lock is not None and self.phase == "locked" and c.rollout.vllm_locked_sync == "lora"
        weights = self.lock.locked.base_state_dict() if locked else self.effective_state_dict()
        context = getattr(self.base_model.config, "max_position_embeddings", None)
        self.sampler = VLLMStudentSampler(
            self.base_model.config,
            weights,
            self.tokenizer,
            self.run_dir / ("vllm_student" if not self.dist.enabled else f"vllm_student-rank{self.dist.rank}"),
            lora_rank=c.lock.rank,
            max_model_len=context,
        )
        self._sampler_base = self._base_key()
        if locked:
            self.sampler.sync_adapter(self.model, ADAPTER_NAME)

    def _base_key(self) -> tuple:
        return (self.phase, getattr(self.lock, "lock_step", None))

    def _sync_sampler(self) -> float:
        """Bring the vLLM sampler up to date after an optimizer step; returns the seconds it took.

        Full-parameter phases copy all weights; the locked phase copies the base once (at the lock) and after that
        only the adapter, as a LoRA (``rollout.vllm_locked_sync=full``: the merged weights, every step).
        """
        if self.lock is None or self.phase != "locked" or self.config.rollout.vllm_locked_sync == "full":
            self._sampler_base = self._base_key()
            return self.sampler.sync_weights(self.effective_state_dict())
        seconds = 0.0
        if self._sampler_base != self._base_key():
            seconds += self.sampler.sync_weights(self.lock.locked.base_state_dict())
            self._sampler_base = self._base_key()
        return seconds + self.sampler.sync_adapter(self.model, ADAPTER_NAME)

    def _add_resume_note(self, exc: BaseException) -> None:
        """Tell whoever sees ``exc`` where the run stopped and how to continue from its last checkpoint."""
        saved = list_checkpoints(self.run_dir)
        where = f"the last complete checkpoint, {saved[-1][1]}, is intact" if saved else "no checkpoint was written"
        note = (
            f"training stopped during step {self.step + 1} of {self.config.max_steps}; {where}: fix the cause and "
            "rerun the same command with resume=true to continue from it."
        )
        if hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note(note)
        logger.error(note)

    def _summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        evals = [r for r in records if "eval_reverse_kl" in r]
        summary: dict[str, Any] = {
            "output_dir": str(self.run_dir),
            "steps": self.step,
            "initial_reverse_kl": evals[0]["eval_reverse_kl"] if evals else None,
            "final_reverse_kl": evals[-1]["eval_reverse_kl"] if evals else None,
            "eval_kl_exact": evals[-1]["eval_kl_exact"] if evals else None,
            "mean_step_time_s": _mean([r["step_time_s"] for r in records if "step_time_s" in r]),
            "world_size": self.dist.world_size,
        }
        if self.lock is not None:
            summary.update(self.lock.summary())
        return summary

    # ------------------------------------------------------------------------------------------ checkpointing
    def save(self) -> Path:
        """Write checkpoint ``step-{step}`` atomically (weights, optimizer, RNG, phase).

        With several processes the main process writes it (their weights and optimizer states are the same) and the
        others wait until it is complete. With ``fsdp`` every process first gathers the shards (weights, optimizer
        state, coefficients), so the checkpoint holds whole tensors, as an unsharded run's does.
        """
        if not self.dist.is_main and not self.fsdp:
            self.dist.barrier()
            return checkpoint_dir(self.run_dir, self.step)
        tensors = {"model": self.effective_state_dict()}
        if self.fsdp:
            from lockedopd.fsdp import gather_optimizer_state_dict

            optimizer_state = gather_optimizer_state_dict(self.optimizer)
        else:
            optimizer_state = self.optimizer.state_dict()
        states = {
            "optimizer": optimizer_state,
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "pyv": random.getstate()[0]},
        }
        trainer_state = {"step": self.step, "phase": self.phase, "world_size": self.dist.world_size}
        if self.lock is not None:
            self.lock.checkpoint_state(tensors, states, trainer_state)
        if not self.dist.is_main:
            self.dist.barrier()
            return checkpoint_dir(self.run_dir, self.step)
        path = save_checkpoint(self.run_dir, self.step, tensors, states, trainer_state)
        self.dist.barrier()
        return path

    def effective_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's weights as a plain model's state dict (adapter deltas merged in when locked); with ``fsdp``
        gathered whole (a collective: every process calls it)."""
        if self.fsdp:
            from lockedopd.fsdp import gather_state_dict, gathered_merged_state_dict

            if self.lock is not None and self.phase == "locked":
                return gathered_merged_state_dict(self.lock.locked)
            return gather_state_dict(self.base_model)
        if self.lock is not None and self.phase == "locked":
            return self.lock.locked.merged_state_dict()
        return {k: v for k, v in self.base_model.state_dict().items()}

    def _check_config_drift(self, step: int) -> None:
        """Refuse to resume with settings other than the run's (except :data:`RESUMABLE_CHANGES`), before anything
        is loaded or written; record allowed changes in ``config_changes.jsonl`` (``config.yaml`` stays as it was)."""
        import yaml

        path = self.run_dir / "config.yaml"
        if not path.is_file():
            return
        saved = yaml.safe_load(path.read_text()) or {}
        changes = config_changes(saved, self.config)
        refused = {key: change for key, change in changes.items() if key not in RESUMABLE_CHANGES}
        if refused:
            listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(refused.items())[:6])
            raise ValueError(
                f"resume: the config differs from the one {self.run_dir} was trained with ({listed}); resume with "
                f"the run's own settings (see {path}) — only {sorted(RESUMABLE_CHANGES)} may change — or start a new "
                "output_dir."
            )
        allowed = {key: list(change) for key, change in changes.items() if key != "resume"}
        if allowed and self.dist.is_main:
            log = self.run_dir / "config_changes.jsonl"
            earlier = log.read_text() if log.is_file() else ""
            atomic_write_text(log, earlier + json.dumps({"resumed_from_step": step, "changes": allowed}) + "\n")

    def _resume_point(self) -> int | None:
        """Restore the newest complete checkpoint when ``resume`` is set; returns its step or None."""
        if self.dist.is_main:  # a kill mid-write leaves temporaries and set-aside directories
            recover_interrupted_writes(self.run_dir)
        self.dist.barrier()
        if not self.config.resume:
            if list_checkpoints(self.run_dir):
                raise FileExistsError(
                    f"{self.run_dir} already holds checkpoints; pass resume=true to continue that run or choose "
                    "another output_dir."
                )
            return None
        found = list_checkpoints(self.run_dir)
        if not found:
            logger.info("resume=true but %s has no checkpoint: starting fresh", self.run_dir)
            return None
        self._check_config_drift(found[-1][0])
        step, path = found[-1]
        tensors, states, trainer_state = load_checkpoint(path)
        self.step = int(trainer_state["step"])
        phase = trainer_state.get("phase", "full")
        if phase == "locked":
            self.apply_phase_change(self.lock.restore_locked(self.base_model, tensors, states, trainer_state))
        else:
            if self.fsdp:  # whole tensors onto this process's shards
                from lockedopd.fsdp import load_full_state_dict

                missing, unexpected = load_full_state_dict(self.base_model, tensors["model"])
            else:
                missing, unexpected = self.base_model.load_state_dict(tensors["model"], strict=False)
            missing = [m for m in missing if not _is_tied_duplicate(self.base_model, m)]
            if missing or unexpected:
                raise ValueError(
                    f"checkpoint {path} does not match the student (missing {missing[:3]}, unexpected "
                    f"{unexpected[:3]}); resume with the config that wrote it."
                )
            self.optimizer.load_state_dict(states["optimizer"])
            if self.fsdp:
                from lockedopd.fsdp import shard_optimizer_state

                shard_optimizer_state(self.optimizer)
            if self.lock is not None:
                self.lock.restore_unlocked(self.base_model, states, trainer_state)
        rng = states["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate((rng["pyv"], tuple(rng["python"]), None))
        saved_world = int(trainer_state.get("world_size", 1))
        if saved_world != self.dist.world_size:  # the step does not depend on the split (see _check_world_size)
            logger.info("resuming a run trained by %d processes with %d", saved_world, self.dist.world_size)
        logger.info("resumed %s from step %d (%s)", self.run_dir, self.step, self.phase)
        return step


def _fsdp_from_launcher(config: OPDConfig) -> OPDConfig:
    """``config`` with ``fsdp`` on when ``accelerate launch`` runs an FSDP config (``ACCELERATE_USE_FSDP=true``)."""
    if config.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("true", "1"):
        return config
    logger.info("accelerate launch with an FSDP config (ACCELERATE_USE_FSDP=true): training with fsdp=true")
    return dataclasses.replace(config, fsdp=True)


def _check_world_size(config: OPDConfig, dist: DistContext) -> None:
    """Refuse settings that cannot mean the same run when ``batch_size`` prompts are split over processes."""
    if config.fsdp and not dist.enabled:
        raise ValueError(
            "fsdp=true shards the student over processes, but this is one process; launch several (torchrun "
            "--nproc_per_node 2 -m lockedopd distill CONFIG fsdp=true) or set fsdp=false."
        )
    if not dist.enabled:
        return
    if config.rollout.backend == "hf" and config.rollout.seeding != "prompt":
        raise ValueError(
            f"{dist.world_size} processes: rollout.seeding=batch samples a micro-batch from one random stream, which "
            "cannot be split over processes; set rollout.seeding=prompt (each prompt its own stream; use it at one "
            "process too for the same run)."
        )
    if config.batch_size < dist.world_size:
        raise ValueError(
            f"batch_size={config.batch_size} prompts cannot be split over {dist.world_size} processes (each needs at "
            f"least one); raise batch_size to >= {dist.world_size} or start fewer processes."
        )
    per_process = []
    if config.objective.token_keep_fraction < 1.0:
        per_process.append("objective.token_keep_fraction (the kept tokens are chosen among each process's)")
    if config.objective.reward_lambda < 1.0:
        per_process.append("objective.reward_lambda (rewards are normalised over each process's prompts)")
    if per_process:
        logger.warning(
            "with %d processes these act per process, so the run differs from a one-process run: %s",
            dist.world_size,
            "; ".join(per_process),
        )


def _is_tied_duplicate(model: nn.Module, name: str) -> bool:
    """True for a weight shared with another (e.g. a tied lm_head), which safetensors stores once."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    out = model.get_output_embeddings()
    return out is not None and name.endswith("lm_head.weight")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _yaml_dump(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="OPD", unit="step", dynamic_ncols=True)
