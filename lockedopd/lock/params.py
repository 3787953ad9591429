"""Which weights train and the full-parameter optimizer over them (OPDTrainer, the lock and the benchmarks)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "build_adamw",
    "freeze_all_but",
    "optimizer_state_bytes",
    "select_target_linears",
    "trainable_parameters",
]


def select_target_linears(model: nn.Module, target_modules: Sequence[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of ``model`` whose last name part is in ``target_modules``, keyed by module name.

    Raises:
        ValueError: nothing matches (naming the suffixes to use).
    """
    suffixes = set(target_modules)
    targets = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] in suffixes
    }
    if not targets:
        raise ValueError(
            f"no Linear module of the student matches target_modules={list(target_modules)}; "
            "name module suffixes such as q_proj or down_proj."
        )
    return targets


def freeze_all_but(model: nn.Module, params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Set ``requires_grad`` on ``params`` only (every other parameter of ``model`` is frozen); returns ``params``."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(params)
    for p in params:
        p.requires_grad_(True)
    return params


def build_adamw(
    params: Iterable[nn.Parameter],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.AdamW:
    """The full-parameter optimizer of the warmup (single-tensor AdamW, the arithmetic LockedAdamW reproduces)."""
    params = list(params)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=False)


def trainable_parameters(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Every parameter an optimizer trains, in group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's state tensors (moments, bases), counted in its ``state_dict()``.

    The state dict is what a checkpoint holds, and it turns objects kept in the state (GaLore's projectors) into the
    tensors they hold, so those count too; bitsandbytes nests its 8-bit moments, block scales and code books one dict
    deeper, and those count as well.
    """

    def tensor_bytes(state: dict) -> int:
        total = 0
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
            elif isinstance(value, dict):
                total += tensor_bytes(value)
        return total

    return sum(tensor_bytes(state) for state in optimizer.state_dict()["state"].values())
