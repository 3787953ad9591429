"""Learning-rate schedules as pure functions of the step (so a resumed run needs no scheduler object)."""

from __future__ import annotations

import math


def lr_at_step(
    step: int, base_lr: float, max_steps: int, kind: str = "cosine", warmup_steps: int = 0, min_lr_ratio: float = 0.1
) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warmup over ``warmup_steps``, then ``constant``, ``linear`` decay or ``cosine`` decay down to
    ``min_lr_ratio · base_lr`` at ``max_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return base_lr
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "linear":
        factor = 1.0 - progress
    elif kind == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr schedule {kind!r}; use constant, linear or cosine.")
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * factor)
