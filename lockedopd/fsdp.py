"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for both phases, as building blocks for a training loop.

* Warmup: :func:`fully_shard_layers` shards each decoder layer (weights, gradients and AdamW state by rows).
  :class:`lockedopd.SubspaceTracker` and :meth:`lockedopd.optim.WarmupCarry.from_optimizer` read such weights and
  moments by gathering one matrix at a time (every process must run them, in the same order).
* Locked phase: :func:`shard_locked_phase` shards the PEFT model of a :class:`lockedopd.phases.LockedPhase` — the
  frozen base and the coefficients A (out × r, split by rows like W) — while the bases V, which are buffers, stay
  whole on every process; the :class:`lockedopd.LockedAdamW` it rebuilds keeps the carried moments sharded like A.

Checked on the CPU with gloo (``tests/test_distributed.py``): the sharded warmup, lock and locked steps equal the
unsharded ones. :class:`lockedopd.OPDTrainer` does not use these yet (its rollouts call ``generate``, whose number of
forward passes differs between processes, and FSDP2 needs every process in every forward).
"""

from __future__ import annotations

from torch import nn

from lockedopd.optim import LockedAdamW, WarmupCarry
from lockedopd.phases import LockedPhase

__all__ = ["decoder_layers", "fully_shard_layers", "shard_locked_phase"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (its ``_no_split_modules`` classes), in order."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no repeated block class (_no_split_modules); shard it with "
            "torch.distributed.fsdp.fully_shard yourself."
        )
    return layers


def fully_shard_layers(model: nn.Module, **fsdp_kwargs) -> nn.Module:
    """Apply ``fully_shard`` to every decoder layer of ``model`` and then to ``model`` itself (in place).

    Build the optimizer after this: the parameters become ``DTensor`` shards. ``fsdp_kwargs`` go to ``fully_shard``
    (``mesh``, ``reshard_after_forward``, ...).
    """
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


def shard_locked_phase(
    phase: LockedPhase,
    carry: WarmupCarry | None,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    **fsdp_kwargs,
) -> LockedPhase:
    """The locked phase with its model sharded by :func:`fully_shard_layers` and a :class:`LockedAdamW` over the
    sharded coefficients, continuing ``carry`` (its moments sharded like the coefficients; ``None`` = fresh).

    ``phase`` comes from :func:`lockedopd.phases.enter_locked_phase` / ``load_locked_phase`` on the whole warmed-up
    model (gather it first, e.g. ``{k: full_tensor(v) for k, v in sharded.state_dict().items()}``); its optimizer
    is replaced, since sharding replaces the parameters it held.
    """
    if phase.kind != "subspace" or not isinstance(phase.optimizer, LockedAdamW):
        raise ValueError(
            f"shard_locked_phase shards a subspace-locked phase trained by LockedAdamW (lock.optimizer=coefficients), "
            f"not a {phase.kind} phase with {type(phase.optimizer).__name__}."
        )
    fully_shard_layers(phase.model, **fsdp_kwargs)
    mode = next(iter(phase.bases.values())).mode
    optimizer = LockedAdamW.from_carry(
        phase.coefficients(), carry if carry is not None else WarmupCarry(), mode=mode, lr=lr, betas=betas, eps=eps
    )
    return LockedPhase(phase.model, optimizer, phase.bases, phase.adapter_name, phase.kind)
