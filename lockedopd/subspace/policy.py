"""When the warmup locks, and why: one settings dataclass and one policy, used by OPDTrainer and the TRL callback."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .basis import SubspaceBasis
from .settings import TrackerSettings, check_lock_mode
from .tracker import SubspaceTracker

__all__ = ["LOCK_REASONS", "LockDecision", "LockPolicy", "TrackerSettings", "build_tracker"]

LOCK_REASONS = ("at_step", "stable", "max_warmup_steps", "basis_path", "train_end")
"""Why a lock happened: pinned step, stability test, warmup bound, a given basis file, end of a TRL warmup run."""


def build_tracker(
    settings: TrackerSettings,
    model: nn.Module,
    target_modules: Sequence[str] | str | None,
    seed: int,
    bounded: bool = True,
) -> SubspaceTracker:
    """A :class:`SubspaceTracker` of ``model`` with ``settings`` (``bounded=False`` drops max_warmup_steps)."""
    kwargs: dict[str, Any] = dataclasses.asdict(settings.tracker_settings())
    if not bounded:
        kwargs["max_warmup_steps"] = None
    return SubspaceTracker(model, target_modules=target_modules, seed=seed, **kwargs)


@dataclass(frozen=True)
class LockDecision:
    """The policy's verdict at one step: lock now, for ``reason``."""

    step: int
    reason: str


class LockPolicy:
    """Decides when to lock and why, from a :class:`SubspaceTracker` that sketches ΔW during warmup.

    * ``at_step`` given: lock exactly after optimizer step ``at_step`` — never earlier, whatever the stability test
      says (its checks run and are reported until it finds the subspace stable), and ``max_warmup_steps`` does not
      apply;
    * otherwise: lock when the tracker declares the subspace stable (reason ``"stable"``) or reaches
      ``max_warmup_steps`` (reason ``"max_warmup_steps"``).

    Steps are counted from the start of tracking (1-based). Both OPDTrainer and
    :class:`lockedopd.integrations.trl.SubspaceLockCallback` use this class, so ``at_step`` means the same in both.

    Args:
        settings: the stability test.
        at_step: pin the lock step (``None``: lock when stable).
    """

    def __init__(self, settings: TrackerSettings, at_step: int | None = None) -> None:
        if at_step is not None and (isinstance(at_step, bool) or not isinstance(at_step, int) or at_step < 1):
            raise ValueError(f"at_step must be None or an int >= 1, got {at_step!r}")
        self.settings = settings.tracker_settings()
        self.at_step = at_step
        self.tracker: SubspaceTracker | None = None
        self.decision: LockDecision | None = None

    def start(self, model: nn.Module, target_modules: Sequence[str] | str | None, seed: int) -> SubspaceTracker:
        """Begin tracking ``model``'s target matrices from their current weights (W_0)."""
        self.tracker = build_tracker(self.settings, model, target_modules, seed, bounded=self.at_step is None)
        self.decision = None
        return self.tracker

    def observe(self, step: int) -> LockDecision | None:
        """Record that ``step`` optimizer steps are done; return a decision once the lock is due (once)."""
        if self.tracker is None:
            raise RuntimeError("LockPolicy.observe before start(): call start(model, target_modules, seed) first.")
        if self.decision is not None:
            return None
        stable = self.tracker.observe(step)
        if self.at_step is not None:
            due = step >= self.at_step
            reason = "at_step"
        else:
            due, reason = stable, self.tracker.reason or "stable"
        if due:
            self.decision = LockDecision(step, reason)
        return self.decision

    def check_at(self, step: int) -> dict[str, Any] | None:
        """The tracker's stability check made at ``step``, if one was (median similarity, stable fraction, ...)."""
        history = self.tracker.history if self.tracker is not None else []
        return history[-1] if history and history[-1].get("step") == step else None

    def bases(self, mode: str) -> dict[str, SubspaceBasis]:
        """The current top-r bases of every target matrix, sorted by name, as :class:`SubspaceBasis` in ``mode``."""
        check_lock_mode(mode, "lock mode")
        pairs = self.tracker.bases()
        if not pairs:
            raise ValueError(
                "lock: the tracker produced no basis (every target update is zero); lower lr or raise "
                "lock.min_warmup_steps."
            )
        return SubspaceBasis.from_pairs(pairs, mode)

    def state_dict(self) -> dict[str, Any]:
        """The tracker's resumable state plus the decision (plain tensors and Python values)."""
        decision = None if self.decision is None else dataclasses.asdict(self.decision)
        return {"tracker": self.tracker.state_dict() if self.tracker is not None else None, "decision": decision}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a started policy (same model, targets, rank and seed)."""
        if state.get("tracker") is not None:
            self.tracker.load_state_dict(state["tracker"])
        self.decision = None if state.get("decision") is None else LockDecision(**state["decision"])
