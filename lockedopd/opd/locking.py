"""Warmup → lock inside :class:`lockedopd.OPDTrainer`.

During warmup a :class:`lockedopd.SubspaceTracker` sketches ΔW_t = W_t − W_0 of every target matrix. When the
top-r right subspaces stop moving (or at ``lock.at_step``), the controller

1. writes ``basis.safetensors`` and the lock-time weights ``lock/base_model.safetensors`` (the warmup update is
   thereby folded into the frozen base weights),
2. wraps the student in the :class:`lockedopd.SubspaceLockedConfig` PEFT adapter (coefficients start at zero, so
   the model's function is unchanged),
3. replaces the full AdamW by :class:`lockedopd.LockedAdamW` over the coefficients, continuing the warmup's step
   count and moments projected into the subspace, and drops the full optimizer state,
4. writes ``adapter/`` (PEFT format).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from lockedopd.checkpoint import atomic_save_safetensors, atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    from lockedopd.opd.trainer import OPDTrainer

logger = logging.getLogger(__name__)
ADAPTER_NAME = "default"


class LockController:
    """Owns the tracker, the lock step and the locked-phase state of one trainer."""

    def __init__(self, trainer: OPDTrainer) -> None:
        self.trainer = trainer
        self.config = trainer.config.lock
        self.run_dir = trainer.run_dir
        self.tracker = None
        self.lock_step: int | None = None
        self.lock_reason: str | None = None
        self.bases: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.peft_model = None
        self.phase_stats: dict[str, dict[str, int]] = {}
        self.events: list[dict[str, Any]] = []
        self.track_origin = 0
        self.lr_scales: list[float] | None = None
        self.monitor = None
        self._watch: dict[str, Any] | None = None
        if trainer.config.monitor.enabled:
            from lockedopd.diagnostics.monitor import TrajectoryMonitor

            m = trainer.config.monitor
            self.monitor = TrajectoryMonitor(every=m.every, capture_threshold=m.capture_threshold, patience=m.patience)
        if self.config.basis_path is None:
            self.tracker = self._new_tracker()

    @property
    def basis_file(self) -> Path:
        """Where the locked basis is written."""
        return self.run_dir / "basis.safetensors"

    @property
    def lock_base_file(self) -> Path:
        """The frozen base weights of the locked phase (warmup update folded in)."""
        return self.run_dir / "lock" / "base_model.safetensors"

    def _new_tracker(self):
        from lockedopd.subspace import SubspaceTracker

        c = self.config
        return SubspaceTracker(
            self.trainer.base_model,
            target_modules=list(self.trainer.target_parameters()),
            rank=c.rank,
            threshold=c.threshold,
            patience=c.patience,
            check_every=c.check_every,
            min_warmup_steps=c.min_warmup_steps,
            max_warmup_steps=c.max_warmup_steps,
            min_fraction=c.min_fraction,
            seed=self.trainer.config.seed,
        )

    # --------------------------------------------------------------------------------------------- the phases
    def start(self) -> None:
        """Called once before step 0 of a fresh run: locks immediately when ``lock.basis_path`` is set."""
        if self.config.basis_path is not None:
            from lockedopd.subspace import load_basis

            bases, _ = load_basis(self.config.basis_path)
            self.lock(0, bases, reason="basis_path")

    def before_backward(self, step: int) -> None:
        """On monitor steps of the locked phase, let the backward pass also fill the frozen weights' gradients."""
        if self.trainer.phase != "locked" or self.monitor is None or not self.monitor.due(step + 1):
            return
        inner = self.peft_model.base_model.model
        self._watch = {"weights": {name: inner.get_submodule(name).base_layer.weight for name in self.bases}}
        for weight in self._watch["weights"].values():
            weight.requires_grad_(True)

    def before_optimizer_step(self, step: int) -> None:
        """Snapshot the coefficients of a monitor step so the locked step can be measured afterwards."""
        if self._watch is not None:
            self._watch["before"] = {name: p.detach().clone() for name, p in self.coefficients().items()}

    def _finish_watch(self, step: int) -> dict[str, Any]:
        """Measure the monitor step, free the full gradients, refreeze the base weights."""
        watch, self._watch = self._watch, None
        inner = self.peft_model.base_model.model
        grads, locked_steps, bases = {}, {}, {}
        after = self.coefficients()
        for name, weight in watch["weights"].items():
            layer = inner.get_submodule(name)
            U = self.bases[name][0] if self.config.mode == "two_sided" else None
            V = self.bases[name][1]
            delta = (after[name].detach() - watch["before"][name]).double()
            locked_steps[name] = (U.double() @ delta if U is not None else delta) @ V.double().T
            grads[name] = weight.grad.detach() if weight.grad is not None else torch.zeros_like(weight)
            bases[name] = (U, V)
            del layer
        check = self.monitor.measure(step, grads, locked_steps, bases)
        for weight in watch["weights"].values():
            weight.grad = None
            weight.requires_grad_(False)
        record = {
            "monitor_captured_energy": check["captured_energy"],
            "monitor_cosine_to_adam": check["cosine_to_adam"],
            "monitor_cosine_to_gradient": check["cosine_to_gradient"],
        }
        if check["drift"]:
            action = self.trainer.config.monitor.on_drift
            record.update(drift=True, drift_action=action)
            if action in ("relock", "unlock"):
                self.unlock(step, relock=action == "relock")
        return record

    def after_optimizer_step(self, step: int) -> dict[str, Any]:
        """Observe the new weights; lock when due; finish a monitor check. Returns metrics for the step's record."""
        record: dict[str, Any] = {}
        self._note_phase_stats()
        if self._watch is not None:
            record.update(self._finish_watch(step))
        if self.trainer.phase != "warmup" or record.get("drift"):
            return record
        # after a relock the tracker's warmup bounds count from the relock step
        stable = self.tracker.observe(step - self.track_origin)
        last = self.tracker.history[-1] if self.tracker.history else None
        if last is not None and last.get("step") == step:
            record["subspace_similarity"] = last["median_similarity"]
            record["subspace_stable_fraction"] = last["fraction_stable"]
        already_locked = any(event["event"] == "lock" for event in self.events)
        forced = self.config.at_step is not None and step >= self.config.at_step and not already_locked
        if forced or stable:
            reason = "at_step" if forced else self.tracker.reason
            self.lock(step, self.tracker.bases(), reason=reason)
            record.update(locked_now=True, lock_step=step, lock_reason=reason)
        return record

    def lock(self, step: int, bases: dict[str, tuple[torch.Tensor, torch.Tensor]], reason: str) -> None:
        """Freeze ``bases`` and switch the trainer to coefficient training."""
        from lockedopd.subspace import save_basis

        trainer = self.trainer
        if not bases:
            raise ValueError(
                "lock: the tracker produced no basis (every target update is zero); lower lr or "
                "raise lock.min_warmup_steps."
            )
        bases = {name: bases[name] for name in sorted(bases)}
        save_basis(
            self.basis_file,
            bases,
            {"step": step, "rank": self.config.rank, "mode": self.config.mode, "reason": reason},
        )
        atomic_save_safetensors(trainer.base_model.state_dict(), self.lock_base_file, {"step": step})
        warmup_optimizer = trainer.optimizer
        full_params = {name: trainer.base_model.get_submodule(name).weight for name in bases}
        self._wrap(bases)
        from lockedopd.optim import LockedAdamW

        c = trainer.config
        self.lr_scales = self._lr_scales(warmup_optimizer, full_params, bases)
        trainer.optimizer = LockedAdamW.from_warmup(
            self.coefficients(),
            warmup_optimizer,
            full_params,
            bases,
            mode=self.config.mode,
            lr=trainer.lr_at(step),
            betas=(c.adam_beta1, c.adam_beta2),
            eps=c.adam_eps,
        )
        # one param group per locked matrix, so each gets its own learning-rate scale (state is keyed by param)
        base_group = {k: v for k, v in trainer.optimizer.param_groups[0].items() if k != "params"}
        trainer.optimizer.param_groups = [
            {**base_group, "params": [p]} for group in trainer.optimizer.param_groups for p in group["params"]
        ]
        warmup_optimizer.state.clear()
        for p in full_params.values():
            p.grad = None
        self.lock_step, self.lock_reason = step, reason
        self.events.append({"step": step, "event": "lock", "reason": reason})
        self.peft_model.save_pretrained(self.run_dir / "adapter")
        logger.info("locked at step %d (%s): %d matrices, rank %d", step, reason, len(bases), self.config.rank)

    def _wrap(self, bases: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Wrap the student in the adapter built from the basis file; trainer then trains only coefficients."""
        import peft

        from lockedopd.adapter import SubspaceLockedConfig

        trainer = self.trainer
        config = SubspaceLockedConfig(
            r=self.config.rank,
            mode=self.config.mode,
            target_modules=list(bases),
            basis_path=str(self.basis_file),
        )
        self.peft_model = peft.get_peft_model(trainer.base_model, config, adapter_name=ADAPTER_NAME)
        self.bases = bases
        trainer.model = self.peft_model
        trainer.phase = "locked"
        self.tracker = None

    def _lr_scales(self, warmup_optimizer, full_params: dict, bases: dict) -> list[float]:
        """Learning-rate multiplier per locked matrix (sorted by name), from ``lock.lr_scale``.

        Adam moves every coordinate it trains by about lr per step. Full AdamW moves the out×in entries of W, and
        the share f of that step inside the subspace is what carries the locked run; coefficient AdamW moves only
        the out×r (or r×r) coefficients, so its W-space step is smaller by about √(f·numel(W)/numel(coef)).
        ``auto`` sets each matrix's scale to that ratio, with f measured from the warmup AdamW state at the lock
        (f = ‖P(u)‖²/‖u‖², u = m̂/(√v̂+ε) the warmup's normalised step), so the locked run keeps the step size of
        projected full AdamW. A number uses that scale everywhere; 1 is plain AdamW on the coefficients.
        """
        if self.config.lr_scale != "auto":
            return [float(self.config.lr_scale)] * len(bases)
        group = warmup_optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        scales = []
        for name in sorted(bases):
            U, V = bases[name]
            state = warmup_optimizer.state.get(full_params[name], {})
            if not state:
                scales.append(1.0)
                continue
            t = float(state["step"])
            m_hat = state["exp_avg"].double() / (1 - beta1**t)
            v_hat = state["exp_avg_sq"].double() / (1 - beta2**t)
            u = m_hat / (v_hat.sqrt() + eps)
            projected = u @ V.double()
            if self.config.mode == "two_sided":
                projected = U.double().T @ projected
            share = float(projected.square().sum() / u.square().sum().clamp_min(1e-300))
            out_dim, in_dim = u.shape
            coef_numel = projected.numel()
            scales.append(max(1.0, (share * out_dim * in_dim / coef_numel) ** 0.5))
        return scales

    def lr_multipliers(self) -> list[float] | None:
        """Per-param-group learning-rate multipliers of the locked optimizer (None outside the locked phase)."""
        return self.lr_scales if self.trainer.phase == "locked" else None

    def unlock(self, step: int, relock: bool) -> None:
        """Fold the adapter into the weights and return to full-parameter training.

        The coefficient moments are lifted back to full-weight coordinates (m_W = m_A·Vᵀ, v_W = v_A·(Vᵀ∘Vᵀ), or
        with U on the left for two-sided) and the step count carries on. With ``relock`` a new tracker starts
        from the current weights and locks a fresh basis once that is stable.
        """
        from lockedopd.optim.locked_adamw import change_moment_basis

        trainer = self.trainer
        coefficient_state = {name: trainer.optimizer.state.get(p, {}) for name, p in self.coefficients().items()}
        bases = self.bases
        trainer.base_model = self.peft_model.merge_and_unload()
        trainer.model = trainer.base_model
        self.peft_model = None
        trainer._freeze_all_but_targets()
        trainer.optimizer = trainer._full_optimizer()
        targets = trainer.target_parameters()
        for name, state in coefficient_state.items():
            if not state:
                continue
            U, V = bases[name]
            left = U if self.config.mode == "two_sided" else None
            m, v = change_moment_basis(state["exp_avg"], state["exp_avg_sq"], left=left, right=V.T)
            param = targets[name]
            step_count = state["step"]
            trainer.optimizer.state[param] = {
                "step": step_count.clone() if torch.is_tensor(step_count) else torch.tensor(float(step_count)),
                "exp_avg": m.to(param.dtype),
                "exp_avg_sq": v.to(param.dtype),
            }
        trainer.phase = "warmup" if relock else "full"
        self.tracker = self._new_tracker() if relock else None
        self.track_origin = step
        self.bases = None
        self.events.append({"step": step, "event": "relock-start" if relock else "unlock"})
        logger.warning("step %d: %s after drift", step, "re-tracking the subspace" if relock else "unlocked")

    def coefficients(self) -> dict[str, torch.nn.Parameter]:
        """The trainable coefficient tensor of each locked module (A: out×r, or C: r×r), sorted by name."""
        inner = self.peft_model.base_model.model
        out = {}
        for name in sorted(self.bases):
            layer = inner.get_submodule(name)
            out[name] = layer._coefficients(ADAPTER_NAME)
        return out

    # ----------------------------------------------------------------------------------------- checkpointing
    def add_to_checkpoint(self, tensors: dict, states: dict, trainer_state: dict) -> None:
        """Add the lock's state to a checkpoint being written."""
        trainer_state["lock_step"] = self.lock_step
        trainer_state["lock_reason"] = self.lock_reason
        trainer_state["lock_events"] = self.events
        trainer_state["track_origin"] = self.track_origin
        trainer_state["lr_scales"] = self.lr_scales
        if self.monitor is not None:
            trainer_state["monitor"] = self.monitor.state_dict()
        if self.trainer.phase == "locked":
            tensors["coefficients"] = {name: p.detach() for name, p in self.coefficients().items()}
        elif self.tracker is not None:
            states["tracker"] = self.tracker.state_dict()

    def restore_warmup(self, tensors: dict, states: dict, trainer_state: dict) -> None:
        """Resume inside the warmup: the tracker's sketches of W_0 come back from the checkpoint."""
        self._restore_common(trainer_state)
        self.track_origin = int(trainer_state.get("track_origin", 0))
        if trainer_state.get("lock_events"):
            # re-tracking after a relock: the tracker's W_0 is the weights at that moment, which its state holds
            self.tracker = self._new_tracker()
        if self.tracker is not None and "tracker" in states:
            self.tracker.load_state_dict(states["tracker"])
        elif trainer_state.get("phase") == "full":
            self.tracker = None

    def _restore_common(self, trainer_state: dict) -> None:
        self.lock_step = trainer_state.get("lock_step")
        self.lock_reason = trainer_state.get("lock_reason")
        self.events = list(trainer_state.get("lock_events", []))
        if self.monitor is not None and "monitor" in trainer_state:
            self.monitor.load_state_dict(trainer_state["monitor"])

    def restore_locked(self, tensors: dict, states: dict, trainer_state: dict) -> None:
        """Resume after the lock: lock-time base weights, basis, coefficients and LockedAdamW state."""
        from lockedopd.optim import LockedAdamW
        from lockedopd.subspace import load_basis

        trainer = self.trainer
        if not self.lock_base_file.is_file() or not self.basis_file.is_file():
            raise FileNotFoundError(
                f"{self.run_dir} is past its lock step but {self.lock_base_file} or {self.basis_file} is missing; "
                "the run directory is incomplete."
            )
        trainer.base_model.load_state_dict(load_file(self.lock_base_file), strict=False)
        bases, _ = load_basis(self.basis_file)
        self._wrap({name: bases[name] for name in sorted(bases)})
        coefficients = self.coefficients()
        saved = tensors.get("coefficients", {})
        if set(saved) != set(coefficients):
            raise ValueError("checkpoint coefficients do not match the locked modules; resume with the same config.")
        with torch.no_grad():
            for name, p in coefficients.items():
                p.copy_(saved[name])
        c = trainer.config
        trainer.optimizer = LockedAdamW(
            [{"params": [p]} for p in coefficients.values()],
            lr=trainer.lr_at(trainer.step),
            betas=(c.adam_beta1, c.adam_beta2),
            eps=c.adam_eps,
        )
        trainer.optimizer.load_state_dict(states["optimizer"])
        self._restore_common(trainer_state)
        self.lr_scales = [float(x) for x in trainer_state["lr_scales"]]

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen base weights W_lock under plain module names (the adapter's coefficients left out)."""
        inner = self.peft_model.base_model.model
        return {
            key.replace(".base_layer.", "."): value
            for key, value in inner.state_dict().items()
            if ".locked_" not in key
        }

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's effective weights under plain module names (W_lock + ΔW for locked modules)."""
        inner = self.peft_model.base_model.model
        merged = self.base_state_dict()
        with torch.no_grad():
            for name in self.bases:
                layer = inner.get_submodule(name)
                key = f"{name}.weight"
                merged[key] = merged[key] + layer.get_delta_weight(ADAPTER_NAME).to(merged[key].dtype)
        return merged

    # -------------------------------------------------------------------------------------------- reporting
    def _note_phase_stats(self) -> None:
        from lockedopd.opd.trainer import optimizer_state_bytes

        phase = self.trainer.phase
        params = self.trainer.trainable_parameters()
        self.phase_stats[phase] = {
            "trainable_params": sum(p.numel() for p in params),
            "optimizer_state_bytes": optimizer_state_bytes(self.trainer.optimizer),
            "gradient_bytes": sum(p.numel() * p.element_size() for p in params),
        }

    def summary(self) -> dict[str, Any]:
        """Lock facts for ``summary.json``."""
        out: dict[str, Any] = {
            "lock_step": self.lock_step,
            "lock_reason": self.lock_reason,
            "lock_events": list(self.events),
            "lr_scale_median": None if not self.lr_scales else sorted(self.lr_scales)[len(self.lr_scales) // 2],
            "phases": dict(self.phase_stats),
        }
        if self.monitor is not None:
            out["monitor"] = self.monitor.summary()
        if self.tracker is not None:
            out["tracker_memory_bytes"] = self.tracker.memory_bytes()
        return out

    def finish(self, summary: dict[str, Any]) -> None:
        """End of training: save the final adapter (PEFT format) next to the run's other results."""
        if self.peft_model is not None:
            self.peft_model.save_pretrained(self.run_dir / "adapter")
        atomic_write_text(self.run_dir / "lock.json", json.dumps(self.summary(), indent=2))
        from lockedopd.diagnostics.run_report import write_trajectory_report

        write_trajectory_report(self.run_dir, summary, self.monitor, self.trainer.config)
