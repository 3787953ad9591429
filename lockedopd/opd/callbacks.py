"""The protocol between :class:`lockedopd.OPDTrainer`'s loop and what steers its phases.

The loop owns the data, the rollouts, the loss and the optimizer step. Whatever changes *what* trains — the subspace
lock (:class:`lockedopd.lock.controller.LockController`), or nothing at all — is a :class:`TrainingCallback`: the loop
calls its hooks at fixed points of every step, and a hook that switches the phase returns a :class:`PhaseChange`
(the module to run, the plain model under it, its optimizer, the phase's name), which the loop applies. A callback
never assigns the trainer's attributes.

The hooks, in the order the loop calls them::

    on_train_begin                       fresh run, before step 0 (may lock at once)
    for each step:
        on_step_begin                    before the micro-batches' backward passes
        on_before_optimizer_step         gradients are final, the weights not yet updated
        on_step_end                      after the update: metrics for the step's record, and maybe a phase change
    on_train_end                         every process, after the last step

    state_dict / load_state_dict         what a checkpoint adds for the callback, and the way back from it

The base class is the callback of a plain full-parameter run: every hook does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class PhaseChange:
    """What the trainer switches to: the module it runs, the plain model under it, its optimizer and the phase."""

    model: nn.Module
    base_model: nn.Module
    optimizer: torch.optim.Optimizer
    phase: str


@dataclass
class CheckpointParts:
    """A checkpoint being written or read: ``tensors`` (safetensors groups), ``states`` (optimizer and RNG state,
    safetensors-encoded) and ``trainer_state`` (JSON). A callback adds its own entries to each."""

    tensors: dict[str, Any]
    states: dict[str, Any]
    trainer_state: dict[str, Any]


class TrainingCallback:
    """Hooks of the OPD loop; subclass and override the ones you need (each default does nothing)."""

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> PhaseChange | None:
        """A fresh run is about to take step 0 (not called on resume)."""
        return None

    def on_step_begin(self, step: int) -> None:
        """Optimizer step ``step`` (0-based) is about to run its micro-batches."""

    def on_before_optimizer_step(self, step: int) -> None:
        """The gradients of step ``step`` (0-based) are final; the optimizer has not stepped yet."""

    def on_step_end(
        self, step: int, phase: str, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, Any], PhaseChange | None]:
        """Optimizer step ``step`` (1-based: the number of steps taken) of ``phase`` is done. Returns metrics for the
        step's record and the phase change to apply, if any."""
        return {}, None

    def on_train_end(self, summary: dict[str, Any] | None) -> None:
        """Training is over; every process calls it (``summary`` is the run's on the main process, else None)."""

    def state_dict(self, parts: CheckpointParts) -> None:
        """Add this callback's state to a checkpoint being written (every process calls it)."""

    def load_state_dict(self, model: nn.Module, parts: CheckpointParts) -> PhaseChange | None:
        """Restore this callback from a checkpoint. ``model`` holds the checkpoint's weights already, unless the
        checkpoint's phase is one this callback owns (then it restores model and optimizer itself and returns the
        change)."""
        phase = parts.trainer_state.get("phase", "full")
        if phase != "full":
            raise ValueError(
                f"the checkpoint was written in phase {phase!r}, which this run has nothing to resume into; resume "
                "with the config that wrote it (lock.enabled as it was)."
            )
        return None

    def owns_phase(self, phase: str) -> bool:
        """Whether the model of ``phase`` is this callback's (the trainer then leaves loading it to the callback)."""
        return False

    def merged_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The student as a plain model's state dict when this callback runs a wrapped model; None otherwise."""
        return None

    def frozen_base_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The frozen weights under an adapter this callback trains (what a vLLM sampler holds as its base)."""
        return None

    def phase_key(self, phase: str) -> tuple:
        """Identifies the current base weights: it changes whenever they are replaced (a lock, a relock)."""
        return (phase,)

    def summary(self) -> dict[str, Any]:
        """Facts for ``summary.json``."""
        return {}
