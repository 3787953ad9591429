"""Optimizers for training inside a locked subspace, and what they carry over from the warmup."""

from .carry import WarmupCarry, lr_scale_from_adam_state
from .factored import FactoredSubspaceAdamW
from .factored_full import FactoredAdamW
from .locked_adamw import PROJECTIONS, LockedAdamW, change_moment_basis, project_adam_moments

__all__ = [
    "PROJECTIONS",
    "FactoredAdamW",
    "FactoredSubspaceAdamW",
    "LockedAdamW",
    "WarmupCarry",
    "change_moment_basis",
    "lr_scale_from_adam_state",
    "project_adam_moments",
]
