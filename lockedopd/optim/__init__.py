"""Optimizers for training inside a locked subspace."""

from .locked_adamw import PROJECTIONS, LockedAdamW, change_moment_basis, project_adam_moments

__all__ = ["PROJECTIONS", "LockedAdamW", "change_moment_basis", "project_adam_moments"]
