"""The lock's plain settings: the lock modes and the stability test's numbers (no tensors, so a config can hold them
without importing the algebra)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["LOCK_MODES", "TrackerSettings", "check_lock_mode"]

LOCK_MODES = ("right", "two_sided")
"""The ways an update can be locked: ``right`` (ΔW = A·Vᵀ) and ``two_sided`` (ΔW = U·C·Vᵀ)."""


def check_lock_mode(mode: str, what: str = "mode") -> str:
    """Return ``mode`` if it is one of :data:`LOCK_MODES`, else raise ``ValueError`` naming the allowed values."""
    if mode not in LOCK_MODES:
        raise ValueError(f"{what}={mode!r} is not a lock mode; allowed values are {list(LOCK_MODES)}.")
    return mode


@dataclass
class TrackerSettings:
    """The stability test of the warmup's update subspace (see :class:`lockedopd.SubspaceTracker`).

    Attributes:
        rank: subspace rank r per matrix.
        threshold: a matrix is stable when its top-r right subspace's similarity to the previous check is >= this.
        patience: consecutive checks with enough stable matrices that make the subspace stable.
        check_every: steps between checks.
        min_fraction: share of matrices that must be stable at a check.
        min_warmup_steps: no lock from the stability test before this step.
        max_warmup_steps: lock at this step even if not yet stable (``null`` = no bound).
        sketch_size / co_sketch_size: sketch widths k and l of the tracker (``null`` = 2r+1 and 2k+1).
    """

    rank: int = 16
    threshold: float = 0.9
    patience: int = 2
    check_every: int = 2
    min_fraction: float = 0.9
    min_warmup_steps: int = 2
    max_warmup_steps: int | None = None
    sketch_size: int | None = None
    co_sketch_size: int | None = None

    def tracker_settings(self) -> TrackerSettings:
        """Just the tracker's settings (a subclass such as ``LockConfig`` carries more)."""
        names = [f.name for f in dataclasses.fields(TrackerSettings)]
        return TrackerSettings(**{name: getattr(self, name) for name in names})
