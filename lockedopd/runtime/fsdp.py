"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for both phases of :class:`lockedopd.OPDTrainer` (``fsdp: true``).

* Warmup: :func:`fully_shard_layers` shards each decoder layer and the rest of the model (weights, gradients and
  AdamW state by rows). Gradients are summed over processes, not averaged (the trainer weights each process's loss
  by its share of the micro-batch's tokens, as in the data-parallel loop). :class:`lockedopd.SubspaceTracker` and
  :meth:`lockedopd.optim.WarmupCarry.from_optimizer` read such weights and moments by gathering one matrix at a time
  (every process must run them, in the same order).
* Rollouts: ``generate`` runs a different number of forward passes on each process (a process whose samples all
  end early stops early), and FSDP2 all-gathers a layer in every forward. :func:`unsharded` therefore gathers every
  layer once before sampling, keeps them whole through any number of forwards (no collective: FSDP2's pre-forward
  ``unshard`` is a no-op on an unsharded group, and with ``reshard_after_forward`` off its post-forward keeps the
  weights), and reshards after — what verl does for its rollouts. ``HFStudentSampler`` calls ``generate`` with
  ``synced_gpus=False`` (transformers turns it on for an FSDP module, and would then all-reduce a "finished" flag
  every token). Held-out evaluation on the main process runs inside it too.
* Lock: the warmed-up weights are gathered into a plain copy of the model (:func:`plain_copy`), the locked phase is
  entered on it as without FSDP, and :func:`shard_locked_phase` shards the model inside the PEFT wrapper (the root
  that ``generate`` enters) — the frozen base and the coefficients A (out × r, split by rows like W) — while the
  bases V, which are buffers, stay whole on every process; the locked optimizer's state moves onto the shards
  (:func:`shard_optimizer_state`).
* Checkpoints hold whole tensors, as an unsharded run writes them: :func:`gather_state_dict`,
  :func:`gathered_merged_state_dict` and :func:`gather_optimizer_state_dict` gather them (every process), the main
  process writes; :func:`load_full_state_dict` and :func:`shard_optimizer_state` put them back onto the shards.

Checked on the CPU with gloo (``tests/test_distributed.py``): a 2-process ``fsdp=true`` run of the tiny recipe
trains the 1-process run's weights within 6.5e-8 relative and resumes bit-identically in either phase. Measured
(``benchmarks/fsdp_gather.py``, 2 processes on 2 busy cores, a 21.1M-parameter Llama): the gather before a rollout
0.46–0.55 s, the per-matrix gathers of one tracker check 0.35–0.38 s (all 56 targets), a whole tracker check
0.7–1.6 s. The rollout's gather comes every micro-batch and the tracker's every ``lock.check_every`` warmup steps,
so the rollout's is the larger cost per step. The price of sampling on gathered weights: each process holds the whole
student while it samples, evaluates, and at the lock.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from lockedopd.lock.phases import LockedPhase, tuner_layers
from lockedopd.runtime.distributed import full_tensor, shard_like

__all__ = [
    "decoder_layers",
    "fsdp_modules",
    "fully_shard_layers",
    "gather_optimizer_state_dict",
    "gather_state_dict",
    "gathered_merged_state_dict",
    "is_sharded",
    "load_full_state_dict",
    "plain_copy",
    "shard_locked_phase",
    "shard_optimizer_state",
    "unsharded",
]

ROW_SHARDED_STATE = ("exp_avg", "exp_avg_sq")
"""Optimizer state keys sharded by rows like their parameter, unless the optimizer names its own
(``row_sharded_state``, e.g. :class:`lockedopd.optim.FactoredSubspaceAdamW`: its moment and its row sums)."""


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


def fully_shard_layers(model: nn.Module, *, sum_gradients: bool = False, **fsdp_kwargs) -> nn.Module:
    """Apply ``fully_shard`` to every decoder layer of ``model`` and then to ``model`` itself (in place).

    Layers reshard after their forward, the root keeps its weights until the backward (FSDP2's defaults, set
    explicitly so :func:`unsharded` can restore them). ``sum_gradients``: gradients are summed over processes
    instead of averaged. Build the optimizer after this: the parameters become ``DTensor`` shards. ``fsdp_kwargs``
    go to ``fully_shard`` (``mesh``, ``mp_policy``, ...).
    """
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=True, **fsdp_kwargs)
    fully_shard(model, reshard_after_forward=False, **fsdp_kwargs)
    if sum_gradients:
        for module in fsdp_modules(model):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    return model


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` that ``fully_shard`` was applied to, in ``modules()`` order (the same on every
    process)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``model`` or a module inside it."""
    return bool(fsdp_modules(model))


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """Gather every FSDP2-sharded layer of ``model`` (a collective: every process enters), keep the weights whole
    through any number of forward passes — each process may run a different number, none communicates — and
    reshard on exit. No-op for a model without FSDP2."""
    modules = fsdp_modules(model)
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield model
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(module is not modules[0], recurse=False)  # the defaults above


@contextlib.contextmanager
def timed_unsharded(model: nn.Module) -> Iterator[Callable[[], float]]:
    """:func:`unsharded`, yielding a function that returns the seconds the gather took."""
    started = time.perf_counter()
    with unsharded(model):
        seconds = time.perf_counter() - started
        yield lambda: seconds


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every shard gathered whole (collective, in state-dict order). A tied weight,
    listed under two keys, is gathered once and appears as one tensor under both, as in an unsharded model."""
    gathered: dict[int, torch.Tensor] = {}
    state = {}
    for key, value in model.state_dict().items():
        if id(value) not in gathered:
            gathered[id(value)] = full_tensor(value.detach())
        state[key] = gathered[id(value)]
    return state


def load_full_state_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load whole tensors (e.g. a checkpoint's) into a sharded ``model``: each process keeps its own slice, no
    communication. Returns ``(missing, unexpected)`` keys as ``load_state_dict(strict=False)`` does."""
    current = model.state_dict()
    local = {key: shard_like(value, current[key]) if key in current else value for key, value in tensors.items()}
    result = model.load_state_dict(local, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


@torch.no_grad()
def gathered_merged_state_dict(phase: LockedPhase) -> dict[str, torch.Tensor]:
    """:meth:`LockedPhase.merged_state_dict` of a sharded subspace phase: base and coefficients gathered whole
    (collective), ΔW = A·Vᵀ added as the adapter layer computes it."""
    if phase.kind != "subspace":
        raise ValueError(f"a sharded {phase.kind} locked phase is not supported; use lock.adapter=subspace.")
    merged = {key: full_tensor(value.detach()) for key, value in phase.base_state_dict().items()}
    for name, layer in tuner_layers(phase.model).items():
        key = f"{name}.weight"
        coefficients = full_tensor(layer.coefficients(phase.adapter_name).detach())
        delta = layer.basis(phase.adapter_name).delta(coefficients)
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.mT
        merged[key] = merged[key] + delta.to(merged[key].dtype)
    return merged


def gather_optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole (collective), as an unsharded
    optimizer would write it."""
    state_dict = optimizer.state_dict()
    state_dict["state"] = {
        index: {key: full_tensor(value) if torch.is_tensor(value) else value for key, value in state.items()}
        for index, state in state_dict["state"].items()
    }
    return state_dict


@torch.no_grad()
def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Slice whole state tensors (loaded from a checkpoint or a warmup carry) like their sharded parameters, in
    place: the keys in the optimizer's ``row_sharded_state`` (default :data:`ROW_SHARDED_STATE`) by rows, the rest
    (step counts, column sums) stay whole. No communication."""
    keys = getattr(optimizer, "row_sharded_state", ROW_SHARDED_STATE)
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            for key in keys:
                value = state.get(key)
                if torch.is_tensor(value) and type(value) is torch.Tensor:
                    state[key] = shard_like(value.contiguous(), param)


def plain_copy(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A new, unsharded model of ``model``'s class and config holding the whole weights ``state`` (from
    :func:`gather_state_dict` or a file). Every process builds one; the global RNG is left as it was."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    config = getattr(model, "config", None)
    if config is None or not hasattr(cls, "_from_config"):
        raise ValueError(
            f"{cls.__name__} is not a transformers model; fsdp=true needs one (it rebuilds it at the lock)."
        )
    dtype = next((value.dtype for value in state.values() if value.is_floating_point()), None)
    with torch.random.fork_rng():  # (its random initialisation is overwritten below)
        copy = cls._from_config(config, dtype=dtype) if dtype is not None else cls._from_config(config)
    missing, unexpected = copy.load_state_dict(dict(state), strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [key for key in missing if not (tied and key.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ValueError(f"the gathered weights do not fit {cls.__name__} (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); report this with the model's name.")  # fmt: skip
    copy.train(model.training)
    return copy


def shard_locked_phase(phase: LockedPhase, **fsdp_kwargs) -> LockedPhase:
    """Shard a subspace-locked phase built on a whole model (``phases.enter_locked_phase``) in place:
    :func:`fully_shard_layers` on the model inside its PEFT wrapper (frozen base and coefficients split by rows, the
    bases whole), and
    its optimizer — :class:`lockedopd.LockedAdamW` or :class:`lockedopd.optim.FactoredSubspaceAdamW`, with whatever
    state it holds (carried from the warmup or loaded from a checkpoint) — moved onto the sharded coefficients.

    ``fsdp_kwargs`` go to :func:`fully_shard_layers` (``sum_gradients``, ``mesh``, ...).
    """
    if phase.kind != "subspace":
        raise ValueError(
            f"shard_locked_phase shards a subspace-locked phase, not a {phase.kind} phase; use lock.adapter=subspace "
            "and lock.optimizer=factored or coefficients."
        )
    before = phase.coefficients()
    # the root is the transformers model inside the PEFT wrapper: ``generate`` enters there, not at the wrapper
    fully_shard_layers(phase.model.get_base_model(), **fsdp_kwargs)
    after = phase.coefficients()
    optimizer = phase.optimizer
    replaced = {id(before[name]): after[name] for name in before}
    for group in optimizer.param_groups:
        group["params"] = [replaced.get(id(p), p) for p in group["params"]]
    for name, old in before.items():
        if old in optimizer.state:
            optimizer.state[after[name]] = optimizer.state.pop(old)
    shard_optimizer_state(optimizer)
    return phase
