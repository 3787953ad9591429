"""On-policy distillation: config, rollout, objectives, the training loop.

``OPDConfig``, ``OPDTrainer`` and ``load_config`` load on first use, so the package's light modules (the config's
fixed values, :mod:`lockedopd.opd.values`) import without the training loop.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["OPDConfig", "OPDTrainer", "load_config"]

_HOMES = {
    "OPDConfig": "lockedopd.opd.config",
    "load_config": "lockedopd.opd.config",
    "OPDTrainer": "lockedopd.opd.trainer",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
