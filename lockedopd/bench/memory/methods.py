"""The benchmark's methods: what each trains, built from the library's registries, with memory options on top.

A method is a :class:`MethodSpec`. Full-parameter methods build their optimizer with
:func:`lockedopd.optim.full.build_full_optimizer` (``FULL_OPTIMIZERS``), methods that train after a lock enter their
phase through ``lockedopd.lock.methods.LOCK_METHODS``; so registering a new baseline makes it benchmarkable as
``full_<name>`` or ``lock_<name>`` (:func:`method_spec`). What only the benchmark has rides on top: activation
checkpointing, the chunked loss, the ``*_mmap`` allocator twins, the inference floor and ``projected_right``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lockedopd.lock.params import freeze_all_but, select_target_linears

__all__ = [
    "LEAN_MALLOC_SUFFIX",
    "METHODS",
    "METHOD_SPECS",
    "MethodSpec",
    "Setup",
    "SkipMethod",
    "method_spec",
    "opd_config",
    "setup_method",
]

KINDS = ("full", "lock", "projected_right", "inference")


@dataclass(frozen=True)
class MethodSpec:
    """How one benchmark method trains: its recipe, the registry entry it builds, and the memory options on top.

    Attributes:
        kind: ``full`` (a ``FULL_OPTIMIZERS`` entry on every target weight), ``lock`` (a ``LOCK_METHODS`` entry,
            entered on random orthonormal bases of rank ``rank``), ``projected_right`` (:class:`LockedAdamW`'s
            projected mode, coefficient-space moments, its basis from the first gradient or random; no registry
            entry keeps those moments) or ``inference`` (the forward under ``no_grad``, no optimizer).
        label: the row's name in the tables.
        entry: the registry entry (an ``optimizer:`` value for ``full``, a lock method for ``lock``).
        mode / lock_optimizer: ``lock.mode`` and ``lock.optimizer`` of a lock (``factored`` is the library default,
            :class:`~lockedopd.optim.FactoredSubspaceAdamW`; ``coefficients`` is :class:`~lockedopd.LockedAdamW`).
        checkpointing: activation checkpointing of the decoder layers (``runtime.activation_checkpointing``).
        chunked: the loss over chunks of ``objective.chunk_size`` completion tokens
            (:mod:`lockedopd.opd.chunked_loss`).
        lean_malloc: the worker fixes glibc's mmap threshold at ``malloc_mmap_threshold`` first
            (``runtime.host_allocator``; what ``OPDConfig.malloc_mmap_threshold`` does).
    """

    kind: str
    label: str
    entry: str = ""
    mode: str = "right"
    lock_optimizer: str = "factored"
    checkpointing: bool = False
    chunked: bool = False
    lean_malloc: bool = False


def _locked(label: str, **options: Any) -> MethodSpec:
    return MethodSpec("lock", label, entry="subspace", **options)


METHOD_SPECS: dict[str, MethodSpec] = {
    "full": MethodSpec("full", "full OPD (AdamW)", entry="adamw"),
    "locked_right": _locked("locked right (A·Vᵀ, factored)"),
    "locked_right_chunked": _locked("locked right + chunked loss", chunked=True),
    "locked_right_ckpt": _locked("locked right + checkpointing", checkpointing=True),
    "locked_right_ckpt_chunked": _locked("locked right + checkpointing + chunked", checkpointing=True, chunked=True),
    "locked_right_adamw": _locked("locked right (A·Vᵀ, LockedAdamW)", lock_optimizer="coefficients"),
    "locked_two_sided": _locked("locked two-sided (U·C·Vᵀ, factored)", mode="two_sided"),
    "lora": MethodSpec("lock", "LoRA + AdamW", entry="lora"),
    "projected_right": MethodSpec("projected_right", "projected full-param (fixed V)"),
    "galore": MethodSpec("full", "GaLore AdamW (galore-torch)", entry="galore"),
    "inference": MethodSpec("inference", "inference (forward, no grad)"),
}
# The same methods with glibc's mmap threshold fixed (suffix _mmap): the allocator's effect, side by side in one run
LEAN_MALLOC_SUFFIX = "_mmap"
LEAN_MALLOC_TWINS = (
    "full",
    "locked_right",
    "locked_right_chunked",
    "locked_right_ckpt",
    "locked_right_ckpt_chunked",
    "inference",
)
for _name in LEAN_MALLOC_TWINS:
    _spec = METHOD_SPECS[_name]
    METHOD_SPECS[_name + LEAN_MALLOC_SUFFIX] = dataclasses.replace(
        _spec, label=_spec.label + ", mmap threshold", lean_malloc=True
    )
METHODS = tuple(METHOD_SPECS)


def method_spec(name: str) -> MethodSpec:
    """The spec of ``name``: one of :data:`METHOD_SPECS`, ``full_<optimizer>`` for any registered full-parameter
    optimizer, or ``lock_<method>`` for any registered lock method (looked up now, so a new entry is measurable).

    Raises:
        ValueError: ``name`` is none of these.
    """
    from lockedopd.lock.methods import LOCK_METHODS
    from lockedopd.optim.full import FULL_OPTIMIZERS

    if name in METHOD_SPECS:
        return METHOD_SPECS[name]
    kind, _, entry = name.partition("_")
    if kind == "full" and entry in FULL_OPTIMIZERS:
        return MethodSpec("full", f"full OPD ({entry})", entry=entry)
    if kind == "lock" and entry in LOCK_METHODS:
        return MethodSpec("lock", f"lock method {entry}", entry=entry)
    raise ValueError(
        f"unknown method {name!r}; allowed: {list(METHODS)}, full_<one of {sorted(FULL_OPTIMIZERS)}> or "
        f"lock_<one of {sorted(LOCK_METHODS)}>."
    )


class SkipMethod(Exception):
    """The method cannot run here (e.g. an optional package is missing); the message says why."""


@dataclass
class Setup:
    """A method ready to run: the module, its optimizer (``None``: inference), a hook run before each optimizer
    step, and the objective chunk size of its loss (0 = unchunked)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    before_step: Any = None
    chunk_size: int = 0


def opd_config(config: dict, spec: MethodSpec) -> Any:
    """The :class:`lockedopd.OPDConfig` the registry entry of ``spec`` reads: the benchmark's learning rate, targets,
    rank, LoRA alpha and GaLore settings, the spec's optimizer, lock mode and lock optimizer (all else default)."""
    from lockedopd.opd.config import config_from_dict

    g = config["galore"]
    return config_from_dict(
        {
            "lr": config["lr"],
            "optimizer": spec.entry if spec.kind == "full" else "adamw",
            "target_modules": list(config["target_modules"]),
            "lock": {
                "rank": config["rank"],
                "mode": spec.mode,
                "optimizer": spec.lock_optimizer,
                "lora_alpha": config["lora"]["alpha"],
            },
            "galore": {
                "rank": config["rank"],
                "update_proj_gap": g["update_proj_gap"],
                "scale": g["scale"],
                "proj_type": g["proj_type"],
            },
        }
    )


def orthonormal(rows: int, r: int, g: torch.Generator) -> torch.Tensor:
    """A random ``(rows, r)`` float32 matrix with orthonormal columns (QR of a float64 Gaussian)."""
    return torch.linalg.qr(torch.randn(rows, r, generator=g, dtype=torch.float64))[0].float()


def _full(spec: MethodSpec, model: nn.Module, targets: dict[str, nn.Linear], config: dict) -> Setup:
    """The registered full-parameter optimizer ``spec.entry`` on every target weight."""
    from lockedopd.optim.full import build_full_optimizer

    params = freeze_all_but(model, [m.weight for m in targets.values()])
    try:
        optimizer = build_full_optimizer(opd_config(config, spec), params)
    except ImportError as exc:  # an optional package (galore-torch, bitsandbytes) is missing
        raise SkipMethod(f"optimizer {spec.entry} does not build here: {exc}") from exc
    return Setup(model, optimizer)


def _lock(spec: MethodSpec, model: nn.Module, targets: dict[str, nn.Linear], config: dict, workdir: Path,
          g: torch.Generator) -> Setup:  # fmt: skip
    """The registered lock method ``spec.entry`` entered on random orthonormal bases, as the trainer enters it
    after a warmup: the targets trainable under a fresh (stateless) warmup optimizer of the registry."""
    from lockedopd.lock.methods import LOCK_METHODS, LockRequest
    from lockedopd.optim.full import build_full_optimizer
    from lockedopd.runtime.distributed import DistContext
    from lockedopd.subspace.basis import SubspaceBasis

    opd = opd_config(config, spec)
    method = LOCK_METHODS.lookup(spec.entry)
    pairs = {n: (orthonormal(m.out_features, opd.lock.rank, g).to(m.weight.device),
                 orthonormal(m.in_features, opd.lock.rank, g).to(m.weight.device))
             for n, m in targets.items()}  # fmt: skip
    warmup = build_full_optimizer(opd, freeze_all_but(model, [m.weight for m in targets.values()]))
    basis_file = workdir / "basis.safetensors"
    bases = {n: SubspaceBasis(V, U, spec.mode) for n, (U, V) in pairs.items()} if method.needs_basis else None
    metadata = {"step": 0, "rank": opd.lock.rank, "mode": spec.mode, "reason": "benchmark", "source": "random"}
    request = LockRequest(model, None, warmup, bases, basis_file, metadata, opd.lr, opd.lock, opd, list(targets),
                          DistContext())  # fmt: skip
    phase, _ = method.enter(request)
    return Setup(phase.model, phase.optimizer)


def _projected_right(model: nn.Module, targets: dict[str, nn.Linear], config: dict, g: torch.Generator) -> Setup:
    """GaLore-style projected full-parameter training: :class:`LockedAdamW` on the full weights, moments out x r
    in coefficient space, a fixed right basis V (random, or the top-r right singular vectors of the first
    gradient, set by the hook before the first step)."""
    from lockedopd.optim import LockedAdamW

    r, lr = config["rank"], config["lr"]
    params = freeze_all_but(model, [m.weight for m in targets.values()])
    if config["projected"]["basis"] == "random":
        basis = [orthonormal(p.shape[1], r, g).to(p.device) for p in params]
        return Setup(model, LockedAdamW([{"params": params, "basis": basis}], lr=lr, projection="right"))
    optimizer = LockedAdamW(params, lr=lr, projection="right")

    def set_basis_from_first_gradient() -> None:
        """Give each weight without a basis the top-r right singular vectors of its gradient."""
        for p in params:
            if optimizer.get_basis(p)[1] is None and p.grad is not None:
                vh = torch.linalg.svd(p.grad.float(), full_matrices=False).Vh
                optimizer.set_basis(p, vh[:r].mT.contiguous())

    return Setup(model, optimizer, set_basis_from_first_gradient)


def setup_method(method: str, model: nn.Module, config: dict, workdir: Path) -> Setup:
    """Wrap/freeze ``model`` and build the optimizer of ``method`` (see :func:`method_spec`), with its options.

    Raises:
        SkipMethod: the method cannot be built here (a missing optional package).
        ValueError: an unknown method.
    """
    from lockedopd.runtime.activation_checkpointing import enable_activation_checkpointing

    spec = method_spec(method)
    targets = select_target_linears(model, config["target_modules"])
    g = torch.Generator().manual_seed(config["seed"] + 2)
    if spec.kind == "inference":
        freeze_all_but(model, [])
        setup = Setup(model, None)
    elif spec.kind == "full":
        setup = _full(spec, model, targets, config)
    elif spec.kind == "lock":
        setup = _lock(spec, model, targets, config, workdir, g)
    elif spec.kind == "projected_right":
        setup = _projected_right(model, targets, config, g)
    else:
        raise ValueError(f"{method}: kind={spec.kind!r} is not one of {list(KINDS)}.")
    if spec.checkpointing:
        enable_activation_checkpointing(setup.model)
    setup.chunk_size = config["objective"]["chunk_size"] if spec.chunked else 0
    return setup
