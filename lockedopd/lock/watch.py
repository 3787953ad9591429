"""The warmup side of every lock, shared by OPDTrainer's :class:`~lockedopd.lock.controller.LockController` and
the TRL :class:`~lockedopd.integrations.trl.SubspaceLockCallback`.

A :class:`WarmupWatch` runs the :class:`~lockedopd.subspace.LockPolicy` (the tracker's sketches and the decision)
and makes a run of several processes act as one: the main process's decision, stability check and bases are the
ones every process gets, and at the lock every process checks that its weights are the main process's. What
happens at the lock (enter a locked phase, or write the lock files and stop) is the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lockedopd.runtime.distributed import DistContext, weights_fingerprint
from lockedopd.subspace.basis import SubspaceBasis
from lockedopd.subspace.policy import LockDecision, LockPolicy
from lockedopd.subspace.settings import TrackerSettings

__all__ = ["WarmupWatch", "check_replicas"]

CHECK_KEYS = ("median_similarity", "fraction_stable")


class WarmupWatch:
    """Track the warmup's update subspace and decide the lock, once for all processes.

    Args:
        settings: the stability test.
        at_step: pin the lock step (``None``: lock when stable); see :class:`~lockedopd.subspace.LockPolicy`.
        dist: this process's place in a multi-process run.
        every_process: track on every process (FSDP2 shards, or a trainer that gives every rank its own tracker);
            otherwise only the main process sketches and the others receive its decision.

    Attributes:
        policy: the policy on a tracking process, ``None`` elsewhere.
    """

    def __init__(
        self, settings: TrackerSettings, at_step: int | None, dist: DistContext, every_process: bool = False
    ) -> None:
        self.settings = settings
        self.at_step = at_step
        self.dist = dist
        self.every_process = every_process
        self.policy: LockPolicy | None = None

    def start(self, model: nn.Module, target_modules: Sequence[str] | str | None, seed: int) -> None:
        """Sketch ``model``'s target matrices as they are now (W_0) on the tracking processes."""
        if not (self.dist.is_main or self.every_process):
            LockPolicy(self.settings, at_step=self.at_step)  # a bad at_step fails here too, not only on the main one
            return
        self.policy = LockPolicy(self.settings, at_step=self.at_step)
        self.policy.start(model, target_modules, seed=seed)

    def observe(self, step: int) -> tuple[LockDecision | None, dict[str, Any] | None]:
        """After ``step`` tracked optimizer steps: the main process's decision (``None``: not yet) and the
        stability check made at this step (median similarity, stable fraction; ``None`` if none was made)."""
        decision = check = None
        if self.policy is not None:
            decision = self.policy.observe(step)
            made = self.policy.check_at(step)
            if made is not None:
                check = {key: made[key] for key in CHECK_KEYS}
        return self.dist.broadcast_object((decision, check))

    def bases(self, mode: str) -> dict[str, SubspaceBasis]:
        """The main process's current top-r bases in ``mode``, on every process."""
        return self.dist.broadcast_object(self.policy.bases(mode) if self.policy is not None else None)

    def check_replicas(self, weights: dict[str, torch.Tensor], step: int) -> None:
        """:func:`check_replicas` of this run's processes."""
        check_replicas(self.dist, weights, step)


def check_replicas(dist: DistContext, weights: dict[str, torch.Tensor], step: int) -> None:
    """Raise unless every process holds the same ``weights`` (data-parallel replicas) at the step-``step`` lock;
    nothing to compare in a single process."""
    if dist.enabled:
        dist.check_same(f"the target weights at the step-{step} lock", weights_fingerprint(weights))
