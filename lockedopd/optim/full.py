"""The full-parameter optimizer a run starts with (``optimizer:`` in the config), built by one function."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["build_full_optimizer"]


def build_full_optimizer(config: Any, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names (an :class:`lockedopd.OPDConfig`) over ``params``.

    ``adamw``: single-tensor AdamW; ``factored``: :class:`~lockedopd.optim.FactoredAdamW` (the locked optimizer's
    Adafactor-factored second moment, in W space); ``adamw8bit``: bitsandbytes' 8-bit AdamW; ``galore``: GaLore's
    AdamW with the ``galore`` section's projection (rank ``galore.rank`` or ``lock.rank``).
    """
    c = config
    betas = (c.adam_beta1, c.adam_beta2)
    if c.optimizer == "galore":
        from lockedopd.optim.galore import build_galore_adamw

        g = c.galore
        return build_galore_adamw(
            params, c.lr, g.rank or c.lock.rank, g.update_proj_gap, g.scale, g.proj_type, betas, c.adam_eps,
            c.weight_decay,
        )  # fmt: skip
    if c.optimizer == "factored":
        from lockedopd.optim.factored_full import FactoredAdamW

        return FactoredAdamW(params, c.lr, betas, c.adam_eps, c.weight_decay)
    if c.optimizer == "adamw8bit":
        from lockedopd.runtime.quantization import build_adamw8bit

        return build_adamw8bit(params, c.lr, betas, c.adam_eps, c.weight_decay)
    from lockedopd.lock.params import build_adamw

    return build_adamw(params, c.lr, betas, c.adam_eps, c.weight_decay)
