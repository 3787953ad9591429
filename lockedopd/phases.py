"""The warmup → lock phase transition (and back), shared by :class:`lockedopd.OPDTrainer` and the TRL callback.

At the lock, both training loops

1. write the basis file and the warmup carry beside it (:func:`write_lock_files`): the frozen top-r bases, and what
   the locked optimizer inherits from the warmup AdamW — its moments in coefficient space and a learning-rate scale
   per matrix (:class:`lockedopd.optim.WarmupCarry`);
2. enter the locked phase (:func:`enter_locked_phase`): the student is wrapped in the
   :class:`lockedopd.SubspaceLockedConfig` PEFT adapter (coefficients start at zero, so the function is unchanged)
   and :meth:`lockedopd.LockedAdamW.from_carry` trains only the coefficients, one param group per matrix with its
   ``lr_scale``.

OPDTrainer does both in one step; the TRL two-run design writes the files at the end of the warmup run and enters
the locked phase for the second run. :func:`leave_locked_phase` is the way back (unlock / relock): the adapter is
folded into the weights and a full AdamW continues with the coefficient moments lifted to weight space.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lockedopd.adapter import SubspaceLockedConfig
from lockedopd.adapter.model import locked_coefficients, locked_layers
from lockedopd.optim import LockedAdamW, WarmupCarry
from lockedopd.params import build_adamw, freeze_all_but, select_target_linears
from lockedopd.subspace.basis import SubspaceBasis, check_lock_mode

__all__ = [
    "ADAPTER_NAME",
    "LockFiles",
    "LockedPhase",
    "carry_path_for",
    "enter_locked_phase",
    "leave_locked_phase",
    "load_locked_phase",
    "write_lock_files",
]

ADAPTER_NAME = "default"


def carry_path_for(basis_path: str | os.PathLike) -> Path:
    """Where the warmup carry of a basis file lives: ``basis.safetensors`` → ``basis.carry.safetensors``."""
    path = Path(basis_path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".carry.safetensors")


@dataclass(frozen=True)
class LockFiles:
    """The files a lock wrote."""

    basis_path: Path
    carry_path: Path | None


def write_lock_files(
    basis_path: str | os.PathLike,
    bases: Mapping[str, SubspaceBasis],
    metadata: Mapping[str, object],
    carry: WarmupCarry | None = None,
) -> LockFiles:
    """Write the basis file (atomically) and, when given, the warmup carry beside it (:func:`carry_path_for`)."""
    basis_path = SubspaceBasis.save_all(basis_path, bases, metadata)
    carry_path = carry.save(carry_path_for(basis_path)) if carry is not None else None
    return LockFiles(Path(basis_path), carry_path)


@dataclass
class LockedPhase:
    """A student in its locked phase: the PEFT-wrapped model, its coefficient optimizer and the frozen bases."""

    model: nn.Module
    optimizer: LockedAdamW
    bases: dict[str, SubspaceBasis]
    adapter_name: str = ADAPTER_NAME

    def coefficients(self) -> dict[str, nn.Parameter]:
        """The trainable coefficients (A: out×r, or C: r×r) of each locked module, sorted by name."""
        return locked_coefficients(self.model, self.adapter_name)

    def lr_scales(self) -> dict[str, float]:
        """Each locked module's learning-rate multiplier (the ``lr_scale`` of its param group)."""
        names = {id(p): name for name, p in self.coefficients().items()}
        return {
            names[id(p)]: float(group.get("lr_scale", 1.0))
            for group in self.optimizer.param_groups
            for p in group["params"]
            if id(p) in names
        }

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen base weights W_lock under plain module names (the adapter's tensors left out)."""
        inner = self.model.get_base_model()
        return {
            key.replace(".base_layer.", "."): value
            for key, value in inner.state_dict().items()
            if ".locked_" not in key
        }

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's effective weights under plain module names (W_lock + ΔW for locked modules)."""
        merged = self.base_state_dict()
        for name, layer in locked_layers(self.model).items():
            key = f"{name}.weight"
            merged[key] = merged[key] + layer.get_delta_weight(self.adapter_name).to(merged[key].dtype)
        return merged


def enter_locked_phase(
    model: nn.Module,
    bases: Mapping[str, SubspaceBasis],
    basis_path: str | os.PathLike,
    carry: WarmupCarry | None,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    adapter_name: str = ADAPTER_NAME,
) -> LockedPhase:
    """Wrap ``model`` in the subspace-locked adapter of ``basis_path`` and build the coefficient optimizer.

    Args:
        model: the warmed-up student (plain ``nn.Module``; wrapped in place by PEFT).
        bases: module name → :class:`SubspaceBasis` (one mode for all), as written to ``basis_path``.
        basis_path: the basis file the adapter reads (it records where the bases came from).
        carry: what the warmup optimizer hands over (moments, lr scales); ``None`` = fresh AdamW state, scale 1.
        lr / betas / eps: the locked optimizer's base learning rate (each group gets ``lr · lr_scale``) and Adam
            settings.
        adapter_name: PEFT adapter name.
    """
    import peft

    modes = {basis.mode for basis in bases.values()}
    if len(modes) != 1:
        raise ValueError(f"enter_locked_phase: the bases mix lock modes {sorted(modes)}; lock with one mode.")
    (mode,) = modes
    check_lock_mode(mode, "lock mode")
    ranks = {basis.rank for basis in bases.values()}
    if len(ranks) != 1:
        raise ValueError(f"enter_locked_phase: the bases have different ranks {sorted(ranks)}; use one rank.")
    config = SubspaceLockedConfig(r=ranks.pop(), mode=mode, target_modules=list(bases), basis_path=str(basis_path))
    peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
    coefficients = locked_coefficients(peft_model, adapter_name)
    optimizer = LockedAdamW.from_carry(
        coefficients, carry if carry is not None else WarmupCarry(), mode=mode, lr=lr, betas=betas, eps=eps
    )
    return LockedPhase(peft_model, optimizer, {name: bases[name] for name in sorted(bases)}, adapter_name)


def load_locked_phase(
    model: nn.Module,
    basis_path: str | os.PathLike,
    *,
    lr: float,
    mode: str = "right",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    adapter_name: str = ADAPTER_NAME,
) -> LockedPhase:
    """:func:`enter_locked_phase` from the files a lock wrote: the basis and, when present, its warmup carry.

    Without a carry file (e.g. a basis from another source) the coefficient optimizer starts fresh with scale 1.
    """
    bases, _ = SubspaceBasis.load_all(basis_path, mode=mode)
    carry_path = carry_path_for(basis_path)
    carry = WarmupCarry.load(carry_path) if carry_path.is_file() else None
    return enter_locked_phase(model, bases, basis_path, carry, lr=lr, betas=betas, eps=eps, adapter_name=adapter_name)


def leave_locked_phase(
    phase: LockedPhase,
    target_modules: Sequence[str],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[nn.Module, torch.optim.AdamW]:
    """Fold the adapter into the weights and return ``(model, full AdamW)`` that continues the locked optimizer.

    The coefficient moments are lifted back to full-weight coordinates (:meth:`SubspaceBasis.lift_moments`) and the
    step count carries on; every target Linear trains again.
    """
    coefficients = phase.coefficients()
    states: dict[str, dict[str, Any]] = {name: phase.optimizer.state.get(p, {}) for name, p in coefficients.items()}
    model = phase.model.merge_and_unload()
    targets = {name: module.weight for name, module in select_target_linears(model, target_modules).items()}
    optimizer = build_adamw(freeze_all_but(model, targets.values()), lr, betas, eps, weight_decay)
    for name, state in states.items():
        if not state:
            continue
        m, v = phase.bases[name].lift_moments(state["exp_avg"], state["exp_avg_sq"])
        param = targets[name]
        step = state["step"]
        optimizer.state[param] = {
            "step": step.clone() if torch.is_tensor(step) else torch.tensor(float(step)),
            "exp_avg": m.to(param.dtype),
            "exp_avg_sq": v.to(param.dtype),
        }
    return model, optimizer
