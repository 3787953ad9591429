"""What trains after the lock: one registered entry per method, so the controller does only the lock.

:class:`~lockedopd.lock.controller.LockController` decides *when* to lock and does what every lock does (check the
replicas agree, write the frozen base and the basis, drop the warmup state, save the adapter). *What* then trains
is a :class:`LockMethod` from :data:`LOCK_METHODS`:

- ``subspace`` — lockedopd's method: the subspace-locked PEFT adapter over the frozen basis, its coefficients
  trained by ``lock.optimizer`` (``factored`` or ``coefficients``) continuing the warmup's moments;
- ``lora`` — the baseline a user would pick: a fresh PEFT LoRA of the same rank on the same modules;
- ``projected_full`` — the benchmark's reference: the full weights stay trainable and W-space AdamW's update is
  projected onto the subspace (full memory).

A config picks one with ``lock.adapter`` / ``lock.optimizer`` (:func:`lock_method_name`); ``lock.basis_source:
random`` gives any method that needs a basis a random one (the control).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lockedopd.lock.phases import (
    LockedPhase,
    enter_locked_phase,
    enter_lora_phase,
    enter_projected_phase,
    write_lock_files,
)
from lockedopd.optim import WarmupCarry
from lockedopd.registry import Registry
from lockedopd.runtime.distributed import DistContext
from lockedopd.subspace.basis import SubspaceBasis

__all__ = ["LOCK_METHODS", "LockMethod", "LockRequest", "lock_method_name", "register_lock_method"]


@dataclass
class LockRequest:
    """What a :class:`LockMethod` gets at the lock.

    Attributes:
        model: the student (its FSDP2 shards with ``fsdp``), the warmup update folded into its weights.
        whole: with ``fsdp``, the student's weights gathered whole (the method enters its phase on a plain copy);
            else None.
        warmup_optimizer: the full-parameter optimizer of the warmup (its moments may be carried).
        bases: the frozen bases in the lock's mode (None for a method that needs none).
        basis_file: where this lock's basis file goes (the main process writes it).
        metadata: the basis file's metadata (step, rank, mode, reason, source).
        lr: the learning rate at the lock step.
        settings: the ``lock`` section of the config.
        config: the run's config (Adam settings, weight decay, ``fsdp``).
        target_names: the full module names of the target matrices.
        dist: this process's place in a multi-process run.
    """

    model: nn.Module
    whole: dict[str, torch.Tensor] | None
    warmup_optimizer: torch.optim.Optimizer
    bases: dict[str, SubspaceBasis] | None
    basis_file: Path
    metadata: dict[str, Any]
    lr: float
    settings: Any
    config: Any
    target_names: list[str]
    dist: DistContext

    @property
    def adam(self) -> dict[str, Any]:
        """The run's Adam ``betas`` and ``eps``."""
        return {"betas": (self.config.adam_beta1, self.config.adam_beta2), "eps": self.config.adam_eps}

    @property
    def lr_scale(self) -> float:
        """``lock.lr_scale`` as a number (``auto`` = 1 for the methods that take one number)."""
        scale = self.settings.lr_scale
        return 1.0 if scale == "auto" else float(scale)


class LockMethod(Protocol):
    """One way of training after the lock.

    Attributes:
        needs_basis: the method trains inside the lock's bases (the controller makes them and keeps the file).
        frozen_base: the method trains an adapter over frozen weights, which the controller writes as
            ``base_model.safetensors`` (a method training the full weights has none).
    """

    needs_basis: bool
    frozen_base: bool

    def enter(self, request: LockRequest) -> tuple[LockedPhase, nn.Module]:
        """Enter the locked phase; every process calls it. Returns the phase and the plain model under it
        (``request.model``, or with ``fsdp`` the whole copy the phase was entered on)."""

    def resume(self, request: LockRequest) -> LockedPhase:
        """Enter the phase again on a resumed run: ``request.model`` holds the lock's weights, ``request.bases``
        the lock's bases; the optimizer starts fresh (the checkpoint's state is loaded into it next)."""


LOCK_METHODS: Registry[LockMethod] = Registry(
    "lock method", "register one with lockedopd.lock.methods.register_lock_method(name, method)"
)


def register_lock_method(name: str, method: LockMethod, replace: bool = False) -> LockMethod:
    """Add ``method`` to :data:`LOCK_METHODS` as ``name``; returns it."""
    LOCK_METHODS.register(name, method, replace)
    return method


def lock_method_name(settings: Any) -> str:
    """The method a ``lock`` section selects: ``lora`` (``adapter: lora``), ``projected_full``
    (``optimizer: projected_full``) or ``subspace``."""
    if settings.adapter == "lora":
        return "lora"
    return "projected_full" if settings.optimizer == "projected_full" else "subspace"


class SubspaceMethod:
    """lockedopd's lock: the subspace-locked adapter, its coefficients continuing the warmup's moments."""

    needs_basis = True
    frozen_base = True

    def enter(self, request: LockRequest) -> tuple[LockedPhase, nn.Module]:
        """Carry the warmup's moments into the bases, write basis and carry, wrap the student in the adapter."""
        s, model, bases = request.settings, request.model, request.bases
        full_params = {name: model.get_submodule(name).weight for name in bases}
        scale = s.lr_scale
        if s.optimizer == "factored" and scale == "auto":
            scale = 1.0  # its steps already have W-space AdamW's size: the warmup's lr continues
        carry = WarmupCarry.from_optimizer(request.warmup_optimizer, full_params, bases, lr_scale=scale)
        if request.dist.is_main:
            write_lock_files(request.basis_file, bases, request.metadata, carry)
        request.dist.barrier()  # the adapter reads the basis file
        if request.whole is not None:
            from lockedopd.runtime.fsdp import plain_copy

            model = plain_copy(model, request.whole)
        locked = enter_locked_phase(model, bases, request.basis_file, carry, lr=request.lr, optimizer=s.optimizer,
                                    base_dtype=s.base_dtype, **request.adam)  # fmt: skip
        if request.whole is not None:
            from lockedopd.runtime.fsdp import shard_locked_phase

            shard_locked_phase(locked, sum_gradients=True)
        return locked, model

    def resume(self, request: LockRequest) -> LockedPhase:
        """The adapter over the lock's basis file, fresh coefficient optimizer."""
        s = request.settings
        return enter_locked_phase(request.model, request.bases, request.basis_file, None, lr=request.lr,
                                  optimizer=s.optimizer, base_dtype=s.base_dtype, **request.adam)  # fmt: skip


class LoraMethod:
    """The LoRA baseline: a fresh PEFT LoRA of the lock's rank on the same modules, trained by AdamW."""

    needs_basis = False
    frozen_base = True

    def enter(self, request: LockRequest) -> tuple[LockedPhase, nn.Module]:
        """Wrap the student in a fresh LoRA (B = 0)."""
        s = request.settings
        locked = enter_lora_phase(request.model, request.target_names, s.rank, lr=request.lr, alpha=s.lora_alpha,
                                  lr_scale=request.lr_scale, **request.adam)  # fmt: skip
        return locked, request.model

    def resume(self, request: LockRequest) -> LockedPhase:
        """A LoRA of the same shape (its factors are loaded from the checkpoint next)."""
        s = request.settings
        return enter_lora_phase(request.model, request.target_names, s.rank, lr=request.lr, alpha=s.lora_alpha,
                                **request.adam)  # fmt: skip


class ProjectedFullMethod:
    """The reference with full memory: full weights trainable, W-space AdamW's update projected onto the bases."""

    needs_basis = True
    frozen_base = False

    def enter(self, request: LockRequest) -> tuple[LockedPhase, nn.Module]:
        """Write the basis file and project the full-weight optimizer's updates from now on."""
        if request.dist.is_main:
            write_lock_files(request.basis_file, request.bases, request.metadata)
        request.dist.barrier()
        locked = enter_projected_phase(
            request.model, request.bases, request.warmup_optimizer, lr=request.lr, lr_scale=request.lr_scale,
            weight_decay=request.config.weight_decay, **request.adam,
        )  # fmt: skip
        return locked, request.model

    def resume(self, request: LockRequest) -> LockedPhase:
        """Projected updates again, fresh W-space moments."""
        return enter_projected_phase(request.model, request.bases, None, lr=request.lr,
                                     weight_decay=request.config.weight_decay, **request.adam)  # fmt: skip


register_lock_method("subspace", SubspaceMethod())
register_lock_method("lora", LoraMethod())
register_lock_method("projected_full", ProjectedFullMethod())
