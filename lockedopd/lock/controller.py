"""Warmup → lock for :class:`lockedopd.OPDTrainer`: the :class:`LockController` decides, the trainer applies.

During warmup a :class:`lockedopd.subspace.LockPolicy` sketches ΔW_t = W_t − W_0 of every target matrix. When it
says so (stable subspace, ``lock.max_warmup_steps`` or exactly ``lock.at_step``), the controller

1. writes ``basis.safetensors``, the warmup carry beside it (:func:`lockedopd.lock.phases.write_lock_files`) and the
   lock-time weights ``lock/base_model.safetensors`` (the warmup update is thereby folded into the frozen base),
2. enters the locked phase (:func:`~lockedopd.lock.phases.enter_locked_phase`: the PEFT adapter, ``LockedAdamW`` with
   the warmup's moments and a learning-rate scale per matrix), and drops the full optimizer state,
3. writes ``adapter/`` (PEFT format),

and hands the trainer a :class:`~lockedopd.opd.callbacks.PhaseChange` — the model to run, its optimizer and the
phase name — which the trainer applies. The controller is the loop's
:class:`~lockedopd.opd.callbacks.TrainingCallback`: it never assigns the trainer's attributes. The same applies to an
unlock or relock after a drift of the trajectory monitor.

With several processes (data parallel, identical weights everywhere) only the main process runs the policy; its
decision and its bases are broadcast, every process checks at the lock that its target weights are the main
process's (a SHA-256 of their bytes), and only the main process writes files (the others wait for them).

With ``fsdp`` (the student sharded by FSDP2, :mod:`lockedopd.runtime.fsdp`) every process runs the policy, since its
tracker gathers each matrix from the shards (a collective); the main process's decision is still the one taken.
At the lock the shards are gathered into a plain copy of the student, the locked phase is entered on it and then
sharded; checkpoints and the adapter hold whole tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lockedopd.adapter.model import locked_layers
from lockedopd.lock.methods import LOCK_METHODS, LockRequest, lock_method_name
from lockedopd.lock.params import optimizer_state_bytes, trainable_parameters
from lockedopd.lock.phases import (
    ADAPTER_NAME,
    LockedPhase,
    leave_locked_phase,
    load_preset_bases,
)
from lockedopd.lock.watch import WarmupWatch, check_replicas
from lockedopd.opd.callbacks import CheckpointParts, PhaseChange, TrainingCallback
from lockedopd.runtime.atomic_io import atomic_copy, atomic_directory, atomic_write_text
from lockedopd.runtime.checkpoint import atomic_save_safetensors
from lockedopd.runtime.distributed import DistContext, full_tensor
from lockedopd.subspace.basis import SubspaceBasis, check_rank_fits
from lockedopd.subspace.policy import LockPolicy

logger = logging.getLogger(__name__)

__all__ = ["ADAPTER_NAME", "LockController", "PhaseChange"]


class LockController(TrainingCallback):
    """The lock's state in one OPD run: the policy during warmup, the locked phase after it, the monitor, the events.

    The loop talks to it only through the :class:`~lockedopd.opd.callbacks.TrainingCallback` hooks.

    Args:
        config: the run's :class:`lockedopd.OPDConfig` (``lock`` and ``monitor`` sections, Adam settings, seed).
        run_dir: the run directory (basis, carry, lock-time weights, adapter, reports).
        model: the student as it starts training (its target matrices' W_0 are sketched now).
        target_names: the full module names of the target matrices.
        lr_at: the learning rate of a 0-based optimizer step.
        dist: this process's place in a multi-process run (default: one process).
    """

    def __init__(
        self, config, run_dir: Path, model: nn.Module, target_names: list[str], lr_at, dist: DistContext | None = None
    ) -> None:
        self.config = config
        self.dist = dist if dist is not None else DistContext()
        self.settings = config.lock
        self.run_dir = Path(run_dir)
        self.target_names = list(target_names)
        self.lr_at = lr_at
        self.watch: WarmupWatch | None = None
        self.locked: LockedPhase | None = None
        self.lock_step: int | None = None
        self.lock_reason: str | None = None
        self.phase_stats: dict[str, dict[str, int]] = {}
        self.events: list[dict[str, Any]] = []
        self.lock_files: dict[str, Any] | None = None  # the current lock's files and their content hashes
        self.track_origin = 0
        self.monitor = None
        self._watch: dict[str, Any] | None = None
        if config.monitor.enabled:
            from lockedopd.diagnostics.monitor import TrajectoryMonitor

            m = config.monitor
            self.monitor = TrajectoryMonitor(every=m.every, capture_threshold=m.capture_threshold, patience=m.patience)
        self.shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in self.target_names}
        check_rank_fits(self.settings.rank, self.shapes)
        self.preset_bases = None  # lock.basis_path, read and checked now: before the run writes anything
        if self.settings.basis_path is not None:
            self.preset_bases = load_preset_bases(self.settings.basis_path, self.settings.mode, self.settings.rank,
                                                  self.shapes)  # fmt: skip
        if self.settings.basis_path is None and self.settings.at_step != 0:
            self._start_policy(model, at_step=self.settings.at_step)

    @property
    def basis_file(self) -> Path:
        """The run-level copy of the latest lock's basis (each lock's own files are in :meth:`lock_dir`)."""
        return self.run_dir / "basis.safetensors"

    def lock_dir(self, generation: int) -> Path:
        """The files of the ``generation``-th lock of the run (0 = the first; a relock writes the next one):
        ``basis.safetensors``, its warmup carry and ``base_model.safetensors`` (W at the lock, warmup folded in).
        Nothing overwrites them, so a checkpoint of any generation resumes with its own files."""
        return self.run_dir / "lock" / f"gen-{generation}"

    def _start_policy(self, model: nn.Module, at_step: int | None) -> None:
        # the main process decides; the others need no sketches unless their weights are shards
        self.watch = WarmupWatch(self.settings, at_step, self.dist, every_process=self.config.fsdp)
        self.watch.start(model, self.target_names, seed=self.config.seed)

    @property
    def policy(self) -> LockPolicy | None:
        """The warmup's lock policy on a tracking process (``None`` after the lock and on the other processes)."""
        return None if self.watch is None else self.watch.policy

    def _adam(self) -> dict[str, Any]:
        c = self.config
        return {"betas": (c.adam_beta1, c.adam_beta2), "eps": c.adam_eps}

    # --------------------------------------------------------------------------------------------- the phases
    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> PhaseChange | None:
        """Before step 0 of a fresh run: lock at once when ``lock.basis_path`` is set or ``lock.at_step`` is 0."""
        if self.preset_bases is not None:
            return self.lock(0, model, optimizer, dict(self.preset_bases), reason="basis_path")
        if self.settings.at_step == 0:
            return self.lock(0, model, optimizer, {}, reason="at_step")
        return None

    def on_step_begin(self, step: int) -> None:
        """On monitor steps of the locked phase (and the step after each, which scores it on a fresh batch), let the
        backward pass also fill the frozen weights' gradients."""
        if self.locked is None or self.locked.kind != "subspace" or self.monitor is None:
            return
        if not self.monitor.wants_gradient(step + 1):
            return
        layers = locked_layers(self.locked.model)
        self._watch = {"weights": {name: layers[name].base_layer.weight for name in self.locked.bases}}
        for weight in self._watch["weights"].values():
            weight.requires_grad_(True)

    def on_before_optimizer_step(self, step: int) -> None:
        """Snapshot the coefficients of a monitor step so the locked step can be measured afterwards."""
        if self._watch is not None:
            self._watch["before"] = {name: p.detach().clone() for name, p in self.locked.coefficients().items()}

    def on_step_end(
        self, step: int, phase: str, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, Any], PhaseChange | None]:
        """Observe the weights after optimizer step ``step`` (1-based) of ``phase``.

        Returns the metrics for the step's record and, when the phase changes (lock, unlock, relock), the change.
        """
        record: dict[str, Any] = {}
        self._note_phase_stats(phase, optimizer)
        if self._watch is not None:
            check, change = self._finish_watch(step)
            record.update(check)
            if change is not None or record.get("drift"):
                return record, change
        if phase != "warmup":
            return record, None
        if self.watch is None:  # (a run locked from the start: lock.basis_path or lock.at_step=0)
            return record, None
        decision, check = self.watch.observe(step - self.track_origin)  # after a relock, bounds count from it
        if check is not None:
            record["subspace_similarity"] = check["median_similarity"]
            record["subspace_stable_fraction"] = check["fraction_stable"]
        if decision is None:
            return record, None
        change = self.lock(step, model, optimizer, self.watch.bases(self.settings.mode), reason=decision.reason)
        record.update(locked_now=True, lock_step=step, lock_reason=decision.reason)
        return record, change

    def lock(
        self,
        step: int,
        model: nn.Module,
        warmup_optimizer: torch.optim.Optimizer,
        bases: dict[str, SubspaceBasis],
        reason: str,
    ) -> PhaseChange:
        """Freeze ``bases`` and switch to training inside them (see the module docstring).

        What then trains is the :mod:`~lockedopd.lock.methods` entry ``lock.adapter`` / ``lock.optimizer`` select
        (the subspace lock, or a baseline: a fresh LoRA, full weights with projected W-space AdamW);
        ``lock.basis_source: random`` swaps the bases for random ones (the control).
        """
        s = self.settings
        method = LOCK_METHODS.lookup(lock_method_name(s))
        main = self.dist.is_main
        fsdp = self.config.fsdp
        if self.dist.enabled and not fsdp:  # (sharded weights are no replicas to compare)
            weights = {name: model.get_submodule(name).weight for name in self.target_names}
            check_replicas(self.dist, weights, step)
        generation = sum(1 for event in self.events if event["event"] == "lock")
        basis_file = self.lock_dir(generation) / "basis.safetensors"
        base_file = self.lock_dir(generation) / "base_model.safetensors"
        warmup_model, whole = model, None
        if fsdp:  # every process gathers the shards: the locked phase is entered on a whole copy, then sharded
            from lockedopd.runtime.fsdp import gather_state_dict

            whole = gather_state_dict(model)
        if method.frozen_base and main:  # the frozen base of an adapter: W at the lock (warmup folded in)
            atomic_save_safetensors(whole if fsdp else model.state_dict(), base_file, {"step": step})
        if method.needs_basis:
            if s.basis_source == "random":
                bases = self._random_bases(model)
            bases = {name: bases[name].with_mode(s.mode) for name in sorted(bases)}
        meta = {"step": step, "rank": s.rank, "mode": s.mode, "reason": reason, "source": s.basis_source}
        request = LockRequest(model, whole, warmup_optimizer, bases if method.needs_basis else None, basis_file, meta,
                              self.lr_at(step), s, self.config, self.target_names, self.dist)  # fmt: skip
        self.locked, model = method.enter(request)
        del request, whole
        self._log_quantization()
        if method.needs_basis and main:
            atomic_copy(basis_file, self.basis_file)
        lock_files = None
        if main:
            lock_files = {
                "dir": str(self.lock_dir(generation).relative_to(self.run_dir)),
                "basis_sha256": file_sha256(basis_file) if basis_file.is_file() else None,
                "base_sha256": file_sha256(base_file) if base_file.is_file() else None,
            }
        self.lock_files = self.dist.broadcast_object(lock_files)
        warmup_optimizer.state.clear()
        trained = {id(p) for p in self.locked.trainable().values()}
        for p in model.parameters():
            if id(p) not in trained:
                p.grad = None
        for p in warmup_model.parameters():  # (the sharded warmup model, with fsdp; else the same model)
            p.grad = None
        self.watch = None
        self.lock_step, self.lock_reason = step, reason
        self.events.append({"step": step, "event": "lock", "reason": reason})
        if self._trains_adapter():
            adapter_state = self.gathered_adapter_state() if fsdp else None
            if main:
                self.save_adapter(adapter_state)
        self.dist.barrier()
        logger.info("locked at step %d (%s, %s): rank %d", step, reason, self.locked.kind, s.rank)
        return PhaseChange(self.locked.model, model, self.locked.optimizer, "locked")

    def _log_quantization(self) -> None:
        """Say what rounding the frozen base to ``lock.base_dtype`` lost (also in ``lock.json``)."""
        report = self.locked.quantization
        if report is not None and report.base_dtype != "keep":
            logger.info(
                "frozen base rounded to %s: relative error ||Q(W) - W|| / ||W|| = %.3g, %d -> %d bytes",
                report.base_dtype, report.relative_error(), report.bytes_before, report.bytes_after,
            )  # fmt: skip

    def _random_bases(self, model: nn.Module) -> dict[str, SubspaceBasis]:
        """The control: random orthonormal bases of the lock's rank for every target matrix (seeded by the run)."""
        generator = torch.Generator().manual_seed(self.config.seed * 7_919 + 104_729)
        bases = {}
        for name in sorted(self.target_names):
            out_features, in_features = model.get_submodule(name).weight.shape
            bases[name] = SubspaceBasis.random(out_features, in_features, self.settings.rank, self.settings.mode,
                                               generator)  # fmt: skip
        return bases

    def _finish_watch(self, step: int) -> tuple[dict[str, Any], PhaseChange | None]:
        """Measure the monitor step (and score the previous check's steps on this batch), free the full gradients,
        refreeze the base weights."""
        watch, self._watch = self._watch, None
        grads = {
            name: weight.grad.detach() if weight.grad is not None else torch.zeros_like(weight)
            for name, weight in watch["weights"].items()
        }
        record: dict[str, Any] = {}
        scored = self.monitor.measure_next_batch(step, grads, self.locked.bases)
        if scored is not None:
            record["monitor_scored_step"] = scored["step"]
            record["monitor_next_batch_predicted_decrease"] = scored["next_batch_predicted_decrease"]
            record["monitor_next_batch_reference_decrease"] = scored["next_batch_reference_decrease"]
        if not self.monitor.due(step):  # only the follow-up of a check
            self._free_watch(watch)
            return record, None
        after = self.locked.coefficients()
        locked_steps = {
            name: self.locked.bases[name].lift((after[name].detach() - watch["before"][name]).double())
            for name in watch["weights"]
        }
        check = self.monitor.measure(step, grads, locked_steps, self.locked.bases, reference_lr=self.lr_at(step - 1))
        del grads, locked_steps
        self._free_watch(watch)
        record.update(
            {
                "monitor_predicted_decrease": check.get("predicted_decrease"),
                "monitor_reference_decrease": check.get("reference_decrease"),
                "monitor_captured_energy": check["captured_energy"],
                "monitor_cosine_to_adam": check["cosine_to_adam"],
                "monitor_cosine_to_gradient": check["cosine_to_gradient"],
            }
        )
        change = None
        if check["drift"]:
            action = self.config.monitor.on_drift
            record.update(drift=True, drift_action=action)
            if action in ("relock", "unlock"):
                self.monitor.drop_pending()  # the next step trains outside this subspace: nothing to score it on
                change = self.unlock(step, relock=action == "relock")
        return record, change

    @staticmethod
    def _free_watch(watch: dict[str, Any]) -> None:
        for weight in watch["weights"].values():
            weight.grad = None
            weight.requires_grad_(False)

    def unlock(self, step: int, relock: bool) -> PhaseChange:
        """Fold the adapter into the weights and return to full-parameter training.

        The coefficient moments are lifted back to full-weight coordinates and the step count carries on (see
        :func:`lockedopd.lock.phases.leave_locked_phase`). With ``relock`` a new policy tracks the subspace from the
        current weights and locks a fresh basis once that is stable.
        """
        c = self.config
        model, optimizer = leave_locked_phase(
            self.locked, c.target_modules, lr=self.lr_at(step), weight_decay=c.weight_decay, **self._adam()
        )
        self.locked = None
        self.track_origin = step
        if relock:
            self._start_policy(model, at_step=None)
        self.events.append({"step": step, "event": "relock-start" if relock else "unlock"})
        logger.warning("step %d: %s after drift", step, "re-tracking the subspace" if relock else "unlocked")
        return PhaseChange(model, model, optimizer, "warmup" if relock else "full")

    # ----------------------------------------------------------------------------------------- checkpointing
    def state_dict(self, parts: CheckpointParts) -> None:
        """Add the lock's state to a checkpoint being written."""
        tensors, states, trainer_state = parts.tensors, parts.states, parts.trainer_state
        trainer_state["lock_step"] = self.lock_step
        trainer_state["lock_reason"] = self.lock_reason
        trainer_state["lock_events"] = self.events
        trainer_state["track_origin"] = self.track_origin
        trainer_state["lr_scales"] = self.lr_scales()
        if self.monitor is not None:
            trainer_state["monitor"] = self.monitor.state_dict()
            if self.monitor.pending_tensors():
                tensors["monitor_pending"] = self.monitor.pending_tensors()
        if self.locked is not None:
            trainer_state["locked_kind"] = self.locked.kind
            trainer_state["lock_files"] = self.lock_files
            if self._trains_adapter():  # (a method training the model's own weights has them saved anyway)
                trained = self.locked.trainable()  # (FSDP2 shards gathered whole)
                tensors["coefficients"] = {name: full_tensor(p.detach()) for name, p in trained.items()}
        elif self.policy is not None:
            states["tracker"] = self.policy.tracker.state_dict()

    def _restore_common(self, trainer_state: dict, tensors: dict | None = None) -> None:
        self.lock_step = trainer_state.get("lock_step")
        self.lock_reason = trainer_state.get("lock_reason")
        self.events = list(trainer_state.get("lock_events", []))
        self.track_origin = int(trainer_state.get("track_origin", 0))
        if self.monitor is not None and "monitor" in trainer_state:
            self.monitor.load_state_dict(trainer_state["monitor"], (tensors or {}).get("monitor_pending"))

    def load_state_dict(self, model: nn.Module, parts: CheckpointParts) -> PhaseChange | None:
        """Resume the lock from a checkpoint: after the lock, the locked phase (:meth:`restore_locked`); before it
        (``model`` already holds the checkpoint's weights), the policy's state (:meth:`restore_unlocked`)."""
        if self.owns_phase(parts.trainer_state.get("phase", "full")):
            return self.restore_locked(model, parts.tensors, parts.states, parts.trainer_state)
        self.restore_unlocked(model, parts.states, parts.trainer_state)
        return None

    def owns_phase(self, phase: str) -> bool:
        """The locked phase's model (adapter, coefficients, its optimizer) is the controller's to restore."""
        return phase == "locked"

    def merged_state_dict(self) -> dict[str, torch.Tensor] | None:
        """In the locked phase, the student's weights with the adapter merged in (gathered whole with ``fsdp``)."""
        if self.locked is None:
            return None
        if self.config.fsdp:
            from lockedopd.runtime.fsdp import gathered_merged_state_dict

            return gathered_merged_state_dict(self.locked)
        return self.locked.merged_state_dict()

    def frozen_base_state_dict(self) -> dict[str, torch.Tensor] | None:
        """In the locked phase, the frozen base under the adapter."""
        return self.locked.base_state_dict() if self.locked is not None else None

    def phase_key(self, phase: str) -> tuple:
        """The phase and the step of the lock that made the current base (a relock makes a new one)."""
        return (phase, self.lock_step)

    def restore_unlocked(self, model: nn.Module, states: dict, trainer_state: dict) -> None:
        """Resume in a full-parameter phase: the policy's sketches of W_0 come back from the checkpoint."""
        self._restore_common(trainer_state)
        if trainer_state.get("phase") == "full":
            self.watch = None
            return
        if self.events:
            # re-tracking after a relock: no pinned step; the sketches of that moment's weights are in the state
            self._start_policy(model, at_step=None)
        if self.policy is not None and "tracker" in states:
            self.policy.tracker.load_state_dict(states["tracker"])

    def restore_locked(self, model: nn.Module, tensors: dict, states: dict, trainer_state: dict) -> PhaseChange:
        """Resume after the lock: base weights, basis, trained tensors and the locked optimizer's state."""
        method = LOCK_METHODS.lookup(trainer_state["locked_kind"])
        files = trainer_state["lock_files"]  # which lock's files this checkpoint trained with, and their hashes
        basis_file = self.run_dir / files["dir"] / "basis.safetensors"
        base_file = self.run_dir / files["dir"] / "base_model.safetensors"
        needed = ([basis_file] if method.needs_basis else []) + ([base_file] if method.frozen_base else [])
        missing = [str(path) for path in needed if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.run_dir} is past its lock step but {missing} is missing; the run directory is incomplete: "
                "resume from a checkpoint before that lock, or start the run again."
            )
        step = int(trainer_state["step"])
        for path, key in ((basis_file, "basis_sha256"), (base_file, "base_sha256")):
            if files.get(key) and file_sha256(path) != files[key]:
                raise ValueError(
                    f"{path} is not the file the step-{step} checkpoint was trained with (its content hash differs): "
                    "it was overwritten or corrupted. Resume from a checkpoint written after it, or restore the file."
                )
        self._restore_common(trainer_state, tensors)
        self.lock_files = files
        s = self.settings
        weights, source = (
            (load_file(base_file), str(base_file)) if method.frozen_base else (tensors["model"], "the checkpoint")
        )
        if self.config.fsdp:  # the locked phase is entered on a whole copy of the student, then sharded
            from lockedopd.runtime.fsdp import plain_copy

            model = plain_copy(model, weights)
        else:
            _load_weights(model, weights, source)
        bases = SubspaceBasis.load_all(basis_file, mode=s.mode)[0] if method.needs_basis else None
        request = LockRequest(model, None, None, bases, basis_file, {}, self.lr_at(step), s, self.config,
                              self.target_names, self.dist)  # fmt: skip
        self.locked = method.resume(request)
        if method.frozen_base:  # an adapter: its trained tensors are in the checkpoint beside the weights
            trained = self.locked.trainable()
            saved = tensors.get("coefficients", {})
            if set(saved) != set(trained):
                raise ValueError(
                    "checkpoint coefficients do not match the locked modules; resume with the same config."
                )
            with torch.no_grad():
                for name, p in trained.items():
                    p.copy_(saved[name])
        self.locked.optimizer.load_state_dict(states["optimizer"])
        saved_scales = trainer_state.get("lr_scales") or {}
        for group, name in zip(self.locked.optimizer.param_groups, self.locked.trainable()):
            group.setdefault("lr_scale", float(saved_scales.get(name, 1.0)))
        if self.config.fsdp:  # coefficients and the optimizer state they hold move onto the shards
            from lockedopd.runtime.fsdp import shard_locked_phase

            shard_locked_phase(self.locked, sum_gradients=True)
        self.watch = None
        return PhaseChange(self.locked.model, model, self.locked.optimizer, "locked")

    def _trains_adapter(self) -> bool:
        """Whether the locked phase trains an adapter over a frozen base (not the model's own weights)."""
        return LOCK_METHODS.lookup(self.locked.kind).frozen_base

    # -------------------------------------------------------------------------------------------- reporting
    def lr_scales(self) -> dict[str, float] | None:
        """Each locked module's learning-rate multiplier (None outside the locked phase)."""
        return self.locked.lr_scales() if self.locked is not None else None

    def _note_phase_stats(self, phase: str, optimizer: torch.optim.Optimizer) -> None:
        params = trainable_parameters(optimizer)
        self.phase_stats[phase] = {
            "trainable_params": sum(p.numel() for p in params),
            "optimizer_state_bytes": optimizer_state_bytes(optimizer),
            "gradient_bytes": sum(p.numel() * p.element_size() for p in params),
        }

    def summary(self) -> dict[str, Any]:
        """Lock facts for ``summary.json``."""
        scales = sorted((self.lr_scales() or {}).values())
        out: dict[str, Any] = {
            "lock_step": self.lock_step,
            "lock_reason": self.lock_reason,
            "lock_events": list(self.events),
            "lr_scale_median": scales[len(scales) // 2] if scales else None,
            "phases": dict(self.phase_stats),
        }
        if self.monitor is not None:
            out["monitor"] = self.monitor.summary()
        quantization = self.locked.quantization if self.locked is not None else None
        if quantization is not None and quantization.base_dtype != "keep":
            out["base_quantization"] = quantization.as_dict()
        if self.policy is not None:
            out["tracker_memory_bytes"] = self.policy.tracker.memory_bytes()
        return out

    def save_adapter(self, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the locked phase's adapter to ``adapter/`` (PEFT format), replacing the previous one atomically.

        ``state``: the adapter's tensors gathered whole (:meth:`gathered_adapter_state`; with ``fsdp``), else the
        model's own."""
        with atomic_directory(self.run_dir / "adapter") as tmp:
            self.locked.model.save_pretrained(tmp, **({"state_dict": state} if state is not None else {}))
        return self.run_dir / "adapter"

    def gathered_adapter_state(self) -> dict[str, torch.Tensor] | None:
        """The adapter's tensors (names containing the adapter's name) gathered whole from FSDP2 shards; every
        process must call it. ``None`` outside a locked phase with an adapter."""
        if self.locked is None or not self._trains_adapter():
            return None
        tag = f".{self.locked.adapter_name}"
        return {
            key: full_tensor(value.detach())
            for key, value in self.locked.model.state_dict().items()
            if f"{tag}." in key or key.endswith(tag)
        }

    def on_train_end(self, summary: dict[str, Any] | None) -> None:
        """End of training: the main process saves the final adapter (PEFT format; with ``fsdp`` every process first
        gathers its tensors whole), ``lock.json`` and the trajectory report next to the run's other results."""
        adapter_state = self.gathered_adapter_state() if self.config.fsdp else None
        if summary is None:
            return
        if self.locked is not None and self._trains_adapter():
            self.save_adapter(adapter_state)
        atomic_write_text(self.run_dir / "lock.json", json.dumps(self.summary(), indent=2))
        from lockedopd.diagnostics.run_report import write_trajectory_report

        write_trajectory_report(self.run_dir, summary, self.monitor, self.config)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 16 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load a full state dict; every key must match (a tied output layer, stored once, may be absent)."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False) if hasattr(model, "config") else False
    missing = [key for key in missing if not (tied and key.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the student (missing {missing[:3]}, unexpected {unexpected[:3]}); resume with "
            "the config that wrote the run."
        )
