"""Use lockedopd inside TRL (or any ``transformers.Trainer``): a warmup callback and the locked PEFT config.

Two-run design.  Locked OPD is two Trainer runs on the same model:

1. **Warmup** (full-parameter): train with any trainer, e.g. TRL's on-policy ``DistillationTrainer`` (or
   ``trl.experimental.gkd.GKDTrainer`` with ``GKDConfig(lmbda=1.0)``), with a :class:`SubspaceLockCallback`
   attached.  The callback sketches every target matrix at the start of training (no copy of ``W_0`` is kept),
   tracks the top-r subspace of the cumulative update ``ΔW = W_t - W_0`` and, once it is stable (or at a fixed
   ``at_step``), writes ``basis.safetensors`` into ``args.output_dir`` (or ``basis_path``) and, by default, stops
   the run (``control.should_training_stop = True``).
2. **Locked phase**: start a second trainer on the *warmed-up* model in its locked phase:
   :meth:`SubspaceLockCallback.locked_phase` (or ``phases.load_locked_phase`` in a new process) wraps
   it in the :class:`~lockedopd.SubspaceLockedConfig` adapter and builds the coefficient optimizer
   (:class:`~lockedopd.optim.FactoredSubspaceAdamW` by default, :class:`~lockedopd.LockedAdamW` with
   ``optimizer="coefficients"``) over the coefficients with the warmup's moments and a learning-rate scale per
   matrix, read from the files the callback wrote at the lock — exactly what :class:`lockedopd.OPDTrainer` does
   (:mod:`lockedopd.lock.phases`). Pass ``model=phase.model, optimizers=(phase.optimizer, None)``; the trainer's
   scheduler scales each matrix's learning rate. (``peft_config=locked_peft_config(basis_path)`` still works, with
   the trainer's plain AdamW on the coefficients: README measured it stalling, 2.82 against 2.18.) Only the
   coefficients inside the frozen subspace train; the base weights stay untouched.

Example::

    import lockedopd  # registers the SUBSPACE_LOCKED PEFT method
    from trl import DistillationConfig, DistillationTrainer
    from lockedopd.integrations.trl import SubspaceLockCallback, locked_peft_config

    args = DistillationConfig(output_dir="run/warmup", max_steps=1000, bf16=False, gradient_checkpointing=False)
    lock = SubspaceLockCallback(rank=16, max_warmup_steps=200)
    warmup = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                                 processing_class=tokenizer, callbacks=[lock])
    warmup.train()  # stops once the subspace is stable; writes run/warmup/basis.safetensors

    phase = lock.locked_phase(warmup.model, lr=1e-5)  # PEFT adapter + coefficient optimizer (moments, lr scales)
    locked = DistillationTrainer(model=phase.model, optimizers=(phase.optimizer, None), teacher_model=teacher,
                                 args=DistillationConfig(output_dir="run/locked", ...), train_dataset=prompts,
                                 processing_class=tokenizer)
    locked.train()

The callback unwraps accelerate/DDP/``torch.compile`` wrappers before reading weights.  Under several processes
(DDP) each process runs the tracker, but the main process's decision is broadcast at every step and its bases at the
lock, where every process also checks that its weights are the main process's (a SHA-256 of their bytes): all ranks
lock at the same step with the same basis; only the main process writes files.
Sharded parameters (FSDP, DeepSpeed ZeRO-3) are not supported: the tracker needs whole 2-D weight matrices.

Metrics of every subspace check (``subspace/median_similarity``, ``subspace/min_similarity``,
``subspace/fraction_stable``, ...) are merged into the trainer's next log entry (``trainer.state.log_history``
and the console).  Reporting integrations (``report_to``) run before user callbacks; use
:meth:`SubspaceLockCallback.install` instead of ``callbacks=[...]`` to let them see these metrics too.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..adapter import SubspaceLockedConfig
from ..lock.phases import COEFFICIENT_OPTIMIZERS, LockedPhase, load_locked_phase, write_lock_files
from ..lock.watch import WarmupWatch
from ..optim import WarmupCarry
from ..runtime.atomic_io import atomic_file
from ..runtime.distributed import init_distributed
from ..subspace import SubspaceTracker, load_basis
from ..subspace.basis import check_lock_mode
from ..subspace.policy import LockPolicy, TrackerSettings

__all__ = ["SubspaceLockCallback", "locked_peft_config", "unwrap_model"]

logger = logging.getLogger(__name__)

BASIS_FILENAME = "basis.safetensors"
TRACKER_STATE_FILENAME = "subspace_tracker.pt"
_STATE_VERSION = 1
_WRAPPER_NAMES = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "FullyShardedDataParallel")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip accelerate / DDP / DeepSpeed / ``torch.compile`` wrappers and return the plain model.

    Raises:
        ValueError: ``model`` is a PEFT model (the warmup must be full-parameter training).
    """
    try:
        from accelerate.utils import extract_model_from_parallel

        model = extract_model_from_parallel(model, keep_torch_compile=False)
    except ImportError:  # pragma: no cover - accelerate is a dependency of transformers.Trainer
        pass
    # fallback for wrappers accelerate does not know (and accelerate-less environments)
    while type(model).__name__ in _WRAPPER_NAMES and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    model = getattr(model, "_orig_mod", model)
    try:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            raise ValueError(
                "SubspaceLockCallback watches a full-parameter warmup, but the trainer's model is a PeftModel. Run "
                "the warmup without peft_config and pass peft_config=locked_peft_config(...) only to the second run."
            )
    except ImportError:  # pragma: no cover
        pass
    return model


def locked_peft_config(
    basis_path: str | os.PathLike,
    mode: str = "right",
    r: int | None = None,
    **kwargs: Any,
) -> SubspaceLockedConfig:
    """A :class:`~lockedopd.SubspaceLockedConfig` for the locked run, with rank and targets read from a basis file.

    Args:
        basis_path: A ``basis.safetensors`` written by :class:`SubspaceLockCallback` (or ``save_basis``).
        mode: ``"right"`` (trainable ``A``, ``ΔW = A Vᵀ``) or ``"two_sided"`` (trainable ``C``, ``ΔW = U C Vᵀ``).
        r: Expected rank; ``None`` takes the file's rank.  A different value raises ``ValueError``.
        **kwargs: Further ``SubspaceLockedConfig`` fields (``init_scale``, ``modules_to_save``, ``task_type``...).
            ``target_modules`` defaults to the exact module names of the basis file.

    Returns:
        The config; pass it as ``peft_config=`` to a TRL trainer or to ``peft.get_peft_model``.
    """
    bases, metadata = load_basis(basis_path)
    ranks = sorted({V.shape[1] for _, V in bases.values()})
    file_rank = int(metadata.get("rank", ranks[0]))
    if r is not None and r != file_rank:
        raise ValueError(f"locked_peft_config: r={r} but the basis file {str(basis_path)!r} has rank {file_rank}.")
    names = sorted(bases)
    # full module names: PEFT matches a list entry when a module's name equals it (or ends with "." + it), so
    # exactly the modules of the basis file are locked
    target_modules = kwargs.pop("target_modules", None)
    if target_modules is None:
        target_modules = names
    return SubspaceLockedConfig(
        r=file_rank, mode=mode, target_modules=target_modules, basis_path=str(basis_path), **kwargs
    )


class SubspaceLockCallback(TrainerCallback):
    """Watch the top-r update subspace during a full-parameter Trainer run; write the lock files, stop at the lock.

    See the module docstring for the two-run design. When and why the run locks is decided by
    :class:`~lockedopd.subspace.LockPolicy`, the same policy :class:`lockedopd.OPDTrainer` uses:

    * ``at_step`` is given: exactly after optimizer step ``at_step`` (stability checks are logged until stable);
    * otherwise: when the tracker declares the subspace stable, or reaches ``max_warmup_steps``.

    At the lock it writes the basis and, beside it, the warmup carry (the AdamW moments in coefficient space and the
    per-matrix learning-rate scales; :class:`~lockedopd.optim.WarmupCarry`) that :meth:`locked_phase` continues from.
    If the run ends before that (``max_steps`` reached) and ``save_on_train_end`` is set, the lock files of the final
    weights are written anyway, with a warning.

    Args:
        settings: the stability test (:class:`~lockedopd.subspace.TrackerSettings`); its fields may also be given as
            keyword arguments (``rank=16, max_warmup_steps=200, ...``), which override ``settings``.
        target_modules: ``None`` (every ``nn.Linear`` except embeddings / LM head), a list of module-name suffixes
            or a full-match regex, as in :class:`~lockedopd.subspace.SubspaceTracker`.
        seed: seed of the tracker's sketches.
        at_step: Pin the lock step (ignores stability).  ``None``: lock when stable.
        basis_path: Where to write the basis; default ``{args.output_dir}/basis.safetensors``.
        mode: lock mode of the carried moments (``"right"`` or ``"two_sided"``); the locked phase must use it.
        lr_scale: ``"auto"`` (per matrix, from the warmup AdamW state; 1 for ``optimizer="factored"``) or one
            number, as ``lock.lr_scale``.
        optimizer: the locked phase's coefficient optimizer, as ``lock.optimizer``: ``"coefficients"``
            (:class:`~lockedopd.LockedAdamW`) or ``"factored"`` (:class:`~lockedopd.optim.FactoredSubspaceAdamW`).
        stop_training: Stop the run once the lock files are written (the warmup is then one Trainer run).
        save_on_train_end: Write the lock files at the end of a run that never locked.
        log_prefix: Prefix of the metric names merged into the trainer's logs.
        tracker_kwargs: Further :class:`TrackerSettings` fields (``sketch_size``, ``co_sketch_size``).

    Attributes:
        policy: The :class:`LockPolicy` (created at ``on_train_begin``); ``tracker`` is its tracker.
        basis_path: Path of the written basis file (``None`` until written).
        locked_step: Optimizer step at which the basis was taken (``None`` until written).
        lock_reason: ``"at_step"``, ``"stable"``, ``"max_warmup_steps"`` or ``"train_end"``.
    """

    def __init__(
        self,
        settings: TrackerSettings | None = None,
        *,
        target_modules: Sequence[str] | str | None = None,
        seed: int = 0,
        at_step: int | None = None,
        basis_path: str | os.PathLike | None = None,
        mode: str = "right",
        lr_scale: float | str = "auto",
        optimizer: str = "factored",
        stop_training: bool = True,
        save_on_train_end: bool = True,
        log_prefix: str = "subspace/",
        tracker_kwargs: dict | None = None,
        **setting_overrides: Any,
    ):
        overrides = {**(tracker_kwargs or {}), **setting_overrides}
        allowed = sorted(f.name for f in dataclasses.fields(TrackerSettings))
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ValueError(f"SubspaceLockCallback: unknown setting(s) {unknown}; allowed: {allowed}.")
        self.settings = dataclasses.replace(settings or TrackerSettings(), **overrides)
        rank = self.settings.rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        LockPolicy(self.settings, at_step=at_step)  # validates at_step now, not at the first step
        if lr_scale != "auto" and (isinstance(lr_scale, (bool, str)) or not lr_scale > 0):
            raise ValueError(f"lr_scale must be 'auto' or a number > 0, got {lr_scale!r}")
        self.target_modules = target_modules
        self.seed = seed
        self.at_step = at_step
        self.mode = check_lock_mode(mode)
        if optimizer not in COEFFICIENT_OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not one of {list(COEFFICIENT_OPTIMIZERS)}.")
        self.optimizer = optimizer
        self.lr_scale = 1.0 if optimizer == "factored" and lr_scale == "auto" else lr_scale
        self.requested_basis_path = None if basis_path is None else Path(basis_path)
        self.stop_training = stop_training
        self.save_on_train_end = save_on_train_end
        self.log_prefix = log_prefix

        self.watch: WarmupWatch | None = None
        self.basis_path: Path | None = None
        self.locked_step: int | None = None
        self.lock_reason: str | None = None
        self._pending_logs: dict[str, float] = {}
        self._n_logged_checks = 0

    @property
    def policy(self) -> LockPolicy | None:
        """The :class:`LockPolicy` of this process (``None`` before ``on_train_begin``)."""
        return None if self.watch is None else self.watch.policy

    @property
    def tracker(self) -> SubspaceTracker | None:
        """The policy's :class:`SubspaceTracker` (``None`` before ``on_train_begin``)."""
        return None if self.policy is None else self.policy.tracker

    # ------------------------------------------------------------------ helpers
    def install(self, trainer) -> SubspaceLockCallback:
        """Add this callback to ``trainer`` *first*, so that reporting integrations also receive its metrics.

        Use instead of ``callbacks=[cb]`` when ``report_to`` is set (wandb, tensorboard, ...).  Returns ``self``.
        """
        handler = trainer.callback_handler
        handler.callbacks = [cb for cb in handler.callbacks if cb is not self]
        handler.callbacks.insert(0, self)
        return self

    def _resolve_basis_path(self, args: TrainingArguments) -> Path:
        if self.requested_basis_path is not None:
            return self.requested_basis_path
        if not args.output_dir:
            raise ValueError("SubspaceLockCallback: args.output_dir is not set; pass basis_path=... explicitly.")
        return Path(args.output_dir) / BASIS_FILENAME

    def _collect_check_metrics(self) -> None:
        history = self.tracker.history
        for entry in history[self._n_logged_checks :]:
            for key in ("median_similarity", "mean_similarity", "min_similarity", "fraction_stable", "consecutive"):
                value = entry.get(key)
                if value is not None:
                    self._pending_logs[f"{self.log_prefix}{key}"] = float(value)
        self._n_logged_checks = len(history)

    def _lock(self, args: TrainingArguments, state: TrainerState, reason: str, **kwargs: Any) -> None:
        path = self._resolve_basis_path(args)
        step = int(state.global_step)
        bases = self.watch.bases(self.mode)
        carry = None
        optimizer, model = kwargs.get("optimizer"), kwargs.get("model")
        if model is not None:
            self.watch.check_replicas({name: unwrap_model(model).get_submodule(name).weight for name in bases}, step)
        if optimizer is not None and model is not None:
            optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
            model = unwrap_model(model)
            full_params = {name: model.get_submodule(name).weight for name in bases}
            carry = WarmupCarry.from_optimizer(optimizer, full_params, bases, lr_scale=self.lr_scale)
        if state.is_world_process_zero:
            meta = {
                "step": step,
                "reason": reason,
                "lock_reason": reason,
                "mode": self.mode,
                "seed": self.seed,
                "source": "SubspaceLockCallback",
            }
            write_lock_files(path, bases, meta, carry)
            logger.info("SubspaceLockCallback: rank-%d basis of step %d -> %s", self.settings.rank, step, path)
        _wait_for_everyone()
        self.basis_path = path
        self.locked_step = step
        self.lock_reason = reason
        self._pending_logs[f"{self.log_prefix}locked_step"] = float(step)

    def locked_phase(
        self,
        model: nn.Module,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> LockedPhase:
        """The locked phase of the warmed-up ``model``: PEFT adapter + the coefficient optimizer continuing
        the warmup (moments and per-matrix lr scales from the files written at the lock), as in OPDTrainer.

        Pass ``model=phase.model, optimizers=(phase.optimizer, None)`` to the second trainer; ``lr`` is its base
        learning rate (each matrix's group gets ``lr · lr_scale``, and the trainer's scheduler scales those).
        """
        if self.basis_path is None:
            raise RuntimeError("SubspaceLockCallback has not written a basis yet; run the warmup first.")
        return load_locked_phase(model, self.basis_path, lr=lr, mode=self.mode, betas=betas, eps=eps,
                                 optimizer=self.optimizer)  # fmt: skip

    def locked_peft_config(self, mode: str = "right", **kwargs: Any) -> SubspaceLockedConfig:
        """:func:`locked_peft_config` of the basis this callback wrote."""
        if self.basis_path is None:
            raise RuntimeError("SubspaceLockCallback has not written a basis yet; run the warmup first.")
        return locked_peft_config(self.basis_path, mode=mode, **kwargs)

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = kwargs.get("model")
        if model is None:
            raise ValueError("SubspaceLockCallback.on_train_begin got no model from the trainer.")
        model = unwrap_model(model)
        # every process tracks (a Trainer gives each its own callback); the main process's decision is the one
        self.watch = WarmupWatch(self.settings, self.at_step, init_distributed(), every_process=True)
        self.watch.start(model, self.target_modules, seed=self.seed)
        self.basis_path = self.locked_step = self.lock_reason = None
        self._pending_logs = {}
        self._n_logged_checks = 0
        if state.global_step > 0:
            self._restore(args, state)
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.tracker is None or self.locked_step is not None:
            return control
        step = int(state.global_step)
        if step <= self.tracker.last_step:  # e.g. a second on_step_end call for the same step
            return control
        decision, _ = self.watch.observe(step)  # the main process decides
        self._collect_check_metrics()
        if decision is not None:
            self._lock(args, state, decision.reason, **kwargs)
            control.should_log = True  # log the final check's metrics even off the logging_steps grid
            if self.stop_training:
                control.should_training_stop = True
        return control

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not self._pending_logs or logs is None:
            return control
        logs.update(self._pending_logs)
        # Trainer.log appended a copy of `logs` to the history before calling the callbacks: update it too
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending_logs)
        self._pending_logs = {}
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.tracker is None or not state.is_world_process_zero:
            return control
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if checkpoint.is_dir():
            with atomic_file(checkpoint / TRACKER_STATE_FILENAME) as tmp:
                torch.save(
                    {
                        "version": _STATE_VERSION,
                        "tracker": self.tracker.state_dict(),
                        "locked_step": self.locked_step,
                        "lock_reason": self.lock_reason,
                        "basis_path": None if self.basis_path is None else str(self.basis_path),
                        "n_logged_checks": self._n_logged_checks,
                    },
                    tmp,
                )
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.tracker is None or self.locked_step is not None or not self.save_on_train_end:
            return control
        if state.global_step < 1:
            return control
        warnings.warn(
            f"SubspaceLockCallback: training ended at step {state.global_step} before the subspace locked "
            f"(checks so far: {len(self.tracker.history)}); writing the basis of the final weights anyway.",
            stacklevel=2,
        )
        self._lock(args, state, "train_end", **kwargs)
        return control

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / TRACKER_STATE_FILENAME
        if not path.is_file():
            warnings.warn(
                f"SubspaceLockCallback: resuming at step {state.global_step} without {path}; the subspace is now "
                "measured from the resumed weights, not from the start of the warmup.",
                stacklevel=3,
            )
            self.tracker.last_step = int(state.global_step)
            return
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("version") != _STATE_VERSION:
            raise ValueError(f"{path} is not a SubspaceLockCallback state file (unknown version).")
        self.tracker.load_state_dict(saved["tracker"])
        self.locked_step = saved["locked_step"]
        self.lock_reason = saved["lock_reason"]
        self.basis_path = None if saved["basis_path"] is None else Path(saved["basis_path"])
        self._n_logged_checks = int(saved["n_logged_checks"])


def _wait_for_everyone() -> None:
    try:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
    except Exception:  # pragma: no cover - no distributed state: nothing to wait for
        pass
