"""The one piece of ``torch.optim.Optimizer.step`` every optimizer here shares."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["evaluate_closure"]


def evaluate_closure(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """The loss that ``step(closure)`` returns: ``closure()`` re-evaluated with gradients enabled (``step`` itself
    runs under ``no_grad``), or None without a closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
