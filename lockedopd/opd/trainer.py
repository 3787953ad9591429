"""The OPD training loop: rollout (:mod:`lockedopd.opd.rollout_policy`: who samples) → teacher scores → objective
→ backward → optimizer step. Phases (``phase`` in metrics.jsonl): ``full`` (plain OPD, no lock configured),
``warmup`` (full parameters while the subspace tracker watches ΔW) and ``locked`` (only the coefficients of the
SubspaceLockedAdapter train). The lock talks to the loop through one callback (:mod:`lockedopd.opd.callbacks`);
saving and resuming live in :mod:`lockedopd.opd.run_checkpoint`, held-out metrics in :mod:`~.run_evaluation`.

Under ``torchrun`` / ``accelerate launch`` the loop runs data-parallel (``runtime.distributed``): each process
samples and scores its contiguous share of every micro-batch of ``batch_size`` prompts, weights its loss by its share
of the micro-batch's loss tokens, and the gradients are summed over processes, so the step is the one a single
process takes on the whole micro-batch. Only the main process evaluates and writes the run directory. With
``fsdp: true`` the student is sharded over the processes instead of replicated (``runtime.fsdp``): rollouts and
the main process's evaluation run on the gathered weights, FSDP2 sums the gradients, checkpoints are gathered whole.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lockedopd.data import PromptRecord
from lockedopd.lock.params import freeze_all_but, optimizer_state_bytes, select_target_linears, trainable_parameters
from lockedopd.opd.callbacks import PhaseChange, TrainingCallback
from lockedopd.opd.chunked_loss import rollout_opd_loss
from lockedopd.opd.config import OPDConfig, config_to_yaml
from lockedopd.opd.loss import teacher_request
from lockedopd.opd.objective_registry import get_objective
from lockedopd.opd.progress import StepProgress
from lockedopd.opd.rollout import Rollout, encode_training_records, rollout_from_completions
from lockedopd.opd.rollout_policy import RolloutPolicy
from lockedopd.opd.run_checkpoint import MetricsLog, resume_note, resume_run, save_run, write_summary
from lockedopd.opd.run_evaluation import RunEvaluator
from lockedopd.opd.schedule import lr_at_step
from lockedopd.opd.seeds import step_seed
from lockedopd.optim.full import build_full_optimizer
from lockedopd.runtime.activation_checkpointing import enable_activation_checkpointing
from lockedopd.runtime.atomic_io import atomic_write_text
from lockedopd.runtime.devices import resolve_device
from lockedopd.runtime.distributed import (
    DistContext,
    check_world_size,
    fsdp_from_launcher,
    init_distributed,
    share_of_micro_batch,
)
from lockedopd.runtime.host_allocator import set_malloc_mmap_threshold
from lockedopd.tasks.rewards import resolve_reward_fn
from lockedopd.teachers.base import TeacherScorer, TeacherScores

__all__ = ["OPDTrainer"]

logger = logging.getLogger(__name__)


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
        dist: this process's place in a multi-process run; ``None`` = ``runtime.distributed.init_distributed()``
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
        device = resolve_device(config.device)
        self.dist = dist if dist is not None else init_distributed(cpu=device.type == "cpu")
        student.to(device)  # a no-op on the CPU
        config = fsdp_from_launcher(config)
        check_world_size(config, self.dist)
        self.fsdp = config.fsdp
        self.dist.broadcast_parameters(student)  # every process starts from the main process's weights
        self.config = config
        self.model = self.base_model = student
        self.tokenizer = tokenizer
        self.teacher = teacher
        self.eval_teacher = eval_teacher if eval_teacher is not None else teacher
        self.train_prompts = train_prompts  # a datasets set stays in its Arrow files (lockedopd.data.DatasetPrompts)
        self.run_dir = Path(config.output_dir)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        # encoded as the run samples them; given completions for an objective without a teacher (sft)
        self.train_ids, self.train_completion_ids = encode_training_records(
            tokenizer, train_prompts, config.data.use_chat_template, config.rollout.max_prompt_tokens,
            with_completions=not self.objective.samples_student, why=f"objective.name={config.objective.name}",
        )  # fmt: skip
        self.evaluator = RunEvaluator(config, tokenizer, eval_prompts, accuracy_problems or [], self.eval_teacher,
                                      self.objective.needs_teacher, self.run_dir)  # fmt: skip
        self.reward_fn = resolve_reward_fn(config.objective.reward_fn) if config.objective.reward_fn else None
        self.request = teacher_request(config.objective)
        self.rollout_policy = RolloutPolicy(config, student, teacher)
        self.phase = "warmup" if config.lock.enabled else "full"
        self.sampler_sync = None  # the vLLM student sampler (rollout.backend=vllm), started by train()
        self.step = 0
        if config.gradient_checkpointing:
            enable_activation_checkpointing(student)
        targets = self.target_parameters()
        params = freeze_all_but(student, targets.values())
        if self.fsdp:  # shard before the optimizer is built: it then holds the shards and their state
            from lockedopd.runtime.fsdp import fully_shard_layers

            fully_shard_layers(student, sum_gradients=True)
            targets = self.target_parameters()
            params = list(targets.values())
        self.optimizer = build_full_optimizer(config, params)
        self.lock: TrainingCallback = TrainingCallback()  # a plain run: nothing steers the phases
        if config.lock.enabled:
            from lockedopd.lock.controller import LockController

            self.lock = LockController(config, self.run_dir, student, list(targets), self.lr_at, dist=self.dist)

    # ----------------------------------------------------------------------------------------------- set-up
    @classmethod
    def from_config(cls, config: OPDConfig) -> OPDTrainer:
        """Build student, teacher and prompts from ``config`` (all checked before anything is written)."""
        from lockedopd.opd.builders import build_run_inputs

        torch.manual_seed(config.seed)
        inputs = build_run_inputs(config)
        return cls(config, inputs.student, inputs.tokenizer, inputs.teacher, inputs.train_prompts, inputs.eval_prompts,
                   eval_teacher=inputs.eval_teacher, accuracy_problems=inputs.accuracy_problems)  # fmt: skip

    @property
    def sampler(self):
        """The vLLM student sampler (``rollout.backend=vllm``, once :meth:`train` has started it), else None."""
        return self.sampler_sync.sampler if self.sampler_sync is not None else None

    def target_parameters(self) -> dict[str, nn.Parameter]:
        """Weights of the student's target Linear modules, keyed by module name."""
        linears = select_target_linears(self.base_model, self.config.target_modules)
        return {name: module.weight for name, module in linears.items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the current phase trains."""
        return trainable_parameters(self.optimizer)

    def apply_phase_change(self, change: PhaseChange) -> None:
        """Switch to the model, optimizer and phase a lock, unlock or relock hands over."""
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
        totals = {"loss": 0.0, "reverse_kl": 0.0, "tokens": 0, "kept_tokens": 0}
        seconds = {"rollout_s": 0.0, "score_s": 0.0, "gather_s": 0.0}
        exact, rewards_seen = [], []
        self.lock.on_step_begin(step)
        self.model.train()
        for micro in range(c.grad_accum_steps):
            out = self._micro_batch_loss(step, micro, seconds)
            (out.loss / c.grad_accum_steps).backward()
            totals["loss"] += float(out.loss.detach()) / c.grad_accum_steps
            totals["reverse_kl"] += out.reverse_kl / c.grad_accum_steps
            totals["tokens"] += out.tokens
            totals["kept_tokens"] += out.kept_tokens
            if out.exact_reverse_kl is not None:
                exact.append(out.exact_reverse_kl)
            if out.reward_mean is not None:
                rewards_seen.append(out.reward_mean)
            del out
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
        self.lock.on_before_optimizer_step(step)
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
            rollout_s=round(seconds["rollout_s"], 4),
            score_s=round(seconds["score_s"], 4),
            step_time_s=round(time.perf_counter() - started, 4),
        )
        if self.fsdp:
            record["gather_s"] = round(seconds["gather_s"], 4)  # the all-gather before the rollouts (in rollout_s)
        return record

    def _micro_batch_loss(self, step: int, micro: int, seconds: dict[str, float]):
        """Sample (or, without a teacher, take the given completions of) this process's share of one micro-batch,
        score it and return the objective's output (its loss weighted by this process's share); adds the rollout,
        scoring and gather seconds to ``seconds``."""
        seed = step_seed(self.config.seed, step, micro)
        picks = self._sample_prompts(step, micro)
        offset = 0  # global index of this process's first prompt: row i samples with seed + offset + i
        if self.dist.enabled:
            offset, picks = self.dist.shard(picks)
        prompt_ids, records = [self.train_ids[i] for i in picks], [self.train_prompts[i] for i in picks]
        prompt_ids, records, groups, offset = self.rollout_policy.expand(prompt_ids, records, offset)
        t0 = time.perf_counter()
        if self.objective.samples_student:
            rollout, gathered = self._sample_rollout(prompt_ids, seed + offset)
            seconds["gather_s"] += gathered
        else:  # supervised: the data's completions
            completions = [self.train_completion_ids[i] for i in picks]
            rollout = rollout_from_completions(prompt_ids, completions, None, self.pad_token_id, self.eos_token_id)
        t1 = time.perf_counter()
        if self.objective.needs_teacher:
            scores = self.teacher.score(rollout.sequences(), rollout.prompt_lengths, **self.request)
        else:  # scored by nobody: sft learns from the completions, rlvr from the rewards
            scores = TeacherScores(torch.zeros(rollout.completion_ids.shape), rollout.completion_mask)
        t2 = time.perf_counter()
        seconds["rollout_s"] += t1 - t0
        seconds["score_s"] += t2 - t1
        rewards = None
        if self.reward_fn is not None:
            texts = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            rewards = torch.tensor(self.reward_fn(texts, [r.answer for r in records]), dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        # objective.chunk_size > 0: no (B, C, V) tensor, the loss over checkpointed chunks of tokens
        out = rollout_opd_loss(self.model, rollout, scores, self.config.objective, rewards, generator, groups)
        return share_of_micro_batch(self.dist, out, len(prompt_ids)) if self.dist.enabled else out

    def _sample_rollout(self, prompt_ids: list[list[int]], seed: int) -> tuple[Rollout, float]:
        """The samples of ``prompt_ids`` (``rollout.policy``'s) and the seconds an FSDP gather took (0 without)."""
        c = self.config
        sampler = self.rollout_policy.sampler(self.model, self.sampler)
        with self._whole_student() as gathered:  # fsdp: every process gathers, then samples alone
            rollout = sampler.generate(prompt_ids, self.pad_token_id, self.eos_token_id, c.rollout.max_new_tokens,
                                       c.rollout.temperature, c.rollout.top_p, seed=seed)  # fmt: skip
            return rollout, gathered()

    def _whole_student(self):
        """With ``fsdp``: the student gathered whole on every process (a collective; each may then run any number
        of forward passes alone) and resharded after. Yields a function returning the seconds the gather took."""
        if not self.fsdp:
            return contextlib.nullcontext(lambda: 0.0)
        from lockedopd.runtime.fsdp import timed_unsharded

        return timed_unsharded(self.model)

    # -------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, accuracy: bool = True) -> dict[str, Any] | None:
        """Every held-out metric of the current student, flat, as metrics.jsonl records them
        (:meth:`lockedopd.opd.run_evaluation.RunEvaluator.metrics`; ``accuracy``: task accuracy too), on the main
        process (``None`` elsewhere). With ``fsdp`` every process must call it: they gather the student for it."""
        with self._whole_student():
            return self.evaluator.metrics(self.model, self.sampler, accuracy) if self.dist.is_main else None

    def _evaluations_due(self, record: dict[str, Any]) -> tuple[bool, bool]:
        """Whether the step just recorded evaluates at all, and whether it measures accuracy: the held-out KL every
        ``eval_steps``, accuracy every ``accuracy.eval_steps``, both at the lock and at the last step."""
        c = self.config
        last_or_lock = self.step == c.max_steps or bool(record.get("locked_now"))
        accuracy = last_or_lock or bool(c.accuracy.eval_steps and self.step % c.accuracy.eval_steps == 0)
        kl = last_or_lock or bool(c.eval_steps and self.step % c.eval_steps == 0)
        return self.evaluator.active and (kl or (accuracy and bool(self.evaluator.accuracy_problems))), accuracy

    # ------------------------------------------------------------------------------------------------- train
    def train(self) -> dict[str, Any]:
        """Run (or resume) training to ``max_steps``; returns a summary (also written to ``summary.json``)."""
        c, main = self.config, self.dist.is_main
        resume_from = resume_run(self)
        self.dist.barrier()  # every process has looked at the run directory before the main process writes to it
        log = None  # metrics.jsonl: the main process's
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume_from is None or not (self.run_dir / "config.yaml").is_file():
                atomic_write_text(self.run_dir / "config.yaml", config_to_yaml(c))
            log = MetricsLog(self.run_dir / "metrics.jsonl", None if resume_from is None else self.step)
        self.dist.barrier()
        if c.rollout.backend == "vllm" and self.sampler_sync is None:
            from lockedopd.opd.vllm_rollout import RunSamplerSync

            self.sampler_sync = RunSamplerSync(self)
        if resume_from is None:
            change = self.lock.on_train_begin(self.base_model, self.optimizer)
            if change is not None:
                self.apply_phase_change(change)
            initial = self.evaluate() if self.evaluator.active and c.eval_at_start else None
            if initial is not None:
                log.write({"step": 0, "phase": self.phase, **initial})
            self.save()
        progress = StepProgress(c.progress and main, total=c.max_steps, initial=self.step)
        try:
            while self.step < c.max_steps:
                record = self._step_and_record()
                if log is not None:
                    log.write(record)
                saves = c.save_steps and self.step % c.save_steps == 0
                if self.step == c.max_steps or saves or record.get("locked_now"):
                    self.save()
                progress.update(record, self.phase)
        except Exception as exc:
            note = resume_note(self.run_dir, self.step, c.max_steps)
            exc.add_note(note)
            logger.error(note)
            raise
        finally:
            progress.close()
        summary = write_summary(self, log.read()) if main else None
        self.lock.on_train_end(summary)
        return self.dist.broadcast_object(summary)  # every process returns the run's summary

    def _step_and_record(self) -> dict[str, Any]:
        """One optimizer step, the callback's verdict on it, the sampler's sync and the evaluations it is due."""
        record = self.training_step(self.step)
        self.step += 1
        extra, change = self.lock.on_step_end(self.step, self.phase, self.base_model, self.optimizer)
        record.update(extra)
        if change is not None:
            self.apply_phase_change(change)
        if self.sampler_sync is not None:
            record["sync_s"] = round(self.sampler_sync.sync(self), 4)
        evaluates, accuracy = self._evaluations_due(record)
        if evaluates:
            result = self.evaluate(accuracy=accuracy)
            if result is not None:
                record.update(result)
        return record

    # ------------------------------------------------------------------------------------------ checkpointing
    def save(self) -> Path:
        """Write checkpoint ``step-{step}`` atomically (:func:`lockedopd.opd.run_checkpoint.save_run`)."""
        return save_run(self)

    def effective_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's weights as a plain model's state dict (adapter deltas merged in when locked); with ``fsdp``
        gathered whole (a collective: every process calls it)."""
        merged = self.lock.merged_state_dict()
        if merged is not None:
            return merged
        if self.fsdp:
            from lockedopd.runtime.fsdp import gather_state_dict

            return gather_state_dict(self.base_model)
        return {k: v for k, v in self.base_model.state_dict().items()}
