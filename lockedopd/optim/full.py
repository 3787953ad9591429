"""The full-parameter optimizers a run can start with (``optimizer:`` in the config): one registered entry each.

Every benchmark and the training loop build the full-parameter optimizer through :func:`build_full_optimizer`, so
a new baseline is one :func:`register_full_optimizer` call (in its own module) plus its test. An entry declares
what the rest of a run needs to know about it: whether a lock can continue from its warmup, and whether it works
on FSDP2 shards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lockedopd.registry import Registry

__all__ = ["FULL_OPTIMIZERS", "FullOptimizer", "build_full_optimizer", "register_full_optimizer"]


@dataclass(frozen=True)
class FullOptimizer:
    """One full-parameter optimizer.

    Attributes:
        build: ``build(config, params)`` → the optimizer over ``params`` (``config`` is an
            :class:`lockedopd.OPDConfig`: ``lr``, Adam settings, weight decay, its own section).
        help: one line for the config's documentation and errors.
        warms_up_a_lock: whether a lock may follow it (the lock carries AdamW-shaped moments); when not, the
            sentence saying why.
        shards_with_fsdp: whether it steps on FSDP2 shards (it needs no whole matrix); when not, the sentence
            saying why.
    """

    build: Callable[[Any, Sequence[nn.Parameter]], torch.optim.Optimizer]
    help: str
    warms_up_a_lock: bool | str = True
    shards_with_fsdp: bool | str = True


FULL_OPTIMIZERS: Registry[FullOptimizer] = Registry(
    "optimizer", "register one with lockedopd.optim.full.register_full_optimizer(name, FullOptimizer(...))"
)


def register_full_optimizer(name: str, entry: FullOptimizer, replace: bool = False) -> None:
    """Make ``optimizer: name`` build ``entry`` (``replace=True`` swaps a registered one)."""
    FULL_OPTIMIZERS.register(name, entry, replace)


def build_full_optimizer(config: Any, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names (an :class:`lockedopd.OPDConfig`) over ``params``."""
    return FULL_OPTIMIZERS.lookup(config.optimizer).build(config, params)


def _betas(c: Any) -> tuple[float, float]:
    return (c.adam_beta1, c.adam_beta2)


def _adamw(c: Any, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    from lockedopd.lock.params import build_adamw

    return build_adamw(params, c.lr, _betas(c), c.adam_eps, c.weight_decay)


def _factored(c: Any, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    from lockedopd.optim.factored_full import FactoredAdamW

    return FactoredAdamW(params, c.lr, _betas(c), c.adam_eps, c.weight_decay)


def _adamw8bit(c: Any, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    from lockedopd.runtime.quantization import build_adamw8bit

    return build_adamw8bit(params, c.lr, _betas(c), c.adam_eps, c.weight_decay)


def _galore(c: Any, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    from lockedopd.optim.galore import build_galore_adamw

    g = c.galore
    rank = g.rank or c.lock.rank
    return build_galore_adamw(
        params, c.lr, rank, g.update_proj_gap, g.scale, g.proj_type, _betas(c), c.adam_eps, c.weight_decay
    )


_WHOLE_MATRICES = "it needs whole matrices"
register_full_optimizer("adamw", FullOptimizer(_adamw, "single-tensor AdamW"))
register_full_optimizer(
    "adamw8bit",
    FullOptimizer(
        _adamw8bit,
        "bitsandbytes' 8-bit AdamW (blockwise-quantized moments)",
        shards_with_fsdp=f"{_WHOLE_MATRICES} (bitsandbytes' blockwise state)",
    ),
)
register_full_optimizer(
    "factored",
    FullOptimizer(
        _factored,
        "AdamW with the Adafactor row/column second moment in W space: the locked optimizer's family, unprojected",
        warms_up_a_lock="it is the full-parameter reference of the factored lock (its warmup state is not carried "
        "into a lock)",
        shards_with_fsdp=f"{_WHOLE_MATRICES} (row and column sums)",
    ),
)
register_full_optimizer(
    "galore",
    FullOptimizer(
        _galore,
        "GaLore's AdamW (galore-torch): a whole-run low-rank-gradient baseline, the `galore` section's projection",
        warms_up_a_lock="it is a whole-run baseline (GaLore refreshes its own projections)",
        shards_with_fsdp=f"{_WHOLE_MATRICES} (GaLore's per-matrix projections)",
    ),
)
