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
from lockedopd.adapter.model import base_module_name, locked_coefficients, locked_layers
from lockedopd.lock.params import build_adamw, freeze_all_but, select_target_linears
from lockedopd.optim import FactoredSubspaceAdamW, LockedAdamW, WarmupCarry
from lockedopd.runtime.quantization import (
    QuantizationReport,
    adam_state_fp32,
    dense_weight,
    is_quantized,
    quantize_linears,
)
from lockedopd.subspace.basis import SubspaceBasis, check_lock_mode

__all__ = [
    "ADAPTER_NAME",
    "LockFiles",
    "LockedPhase",
    "carry_path_for",
    "COEFFICIENT_OPTIMIZERS",
    "enter_locked_phase",
    "LOCKED_KINDS",
    "enter_lora_phase",
    "enter_projected_phase",
    "leave_locked_phase",
    "tuner_layers",
    "load_locked_phase",
    "load_preset_bases",
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


COEFFICIENT_OPTIMIZERS = ("coefficients", "factored")
"""How subspace coefficients are optimised: Adam per coefficient, or W-space Adam's step with a factored moment."""

LOCKED_KINDS = ("subspace", "lora", "projected_full")
"""What a locked phase trains: subspace coefficients (lockedopd), a LoRA (baseline), or full weights whose AdamW
update is projected onto the subspace (the benchmark's reference with full W-space moments, full memory)."""


@dataclass
class LockedPhase:
    """A student in its locked phase: the model it runs, its optimizer, the frozen bases and what kind it is.

    ``kind`` is one of :data:`LOCKED_KINDS`: ``subspace`` (PEFT subspace-locked adapter, :class:`LockedAdamW` on
    the coefficients), ``lora`` (PEFT LoRA, AdamW; no bases) or ``projected_full`` (plain model, full weights
    trained by :class:`LockedAdamW` with W-space moments and projected updates).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    bases: dict[str, SubspaceBasis]
    adapter_name: str = ADAPTER_NAME
    kind: str = "subspace"
    quantization: QuantizationReport | None = None

    def coefficients(self) -> dict[str, nn.Parameter]:
        """The trainable coefficients (A: out×r, or C: r×r) of each locked module, sorted by name (subspace only)."""
        if self.kind != "subspace":
            raise ValueError(f"a {self.kind} locked phase has no subspace coefficients; use trainable().")
        return locked_coefficients(self.model, self.adapter_name)

    def trainable(self) -> dict[str, nn.Parameter]:
        """Everything the phase trains, by name: coefficients (module names), LoRA factors or full weights."""
        if self.kind == "subspace":
            return self.coefficients()
        if self.kind == "projected_full":
            return {name: self.model.get_submodule(name).weight for name in self.bases}
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def lr_scales(self) -> dict[str, float]:
        """Each trained tensor's learning-rate multiplier (the ``lr_scale`` of its param group)."""
        names = {id(p): name for name, p in self.trainable().items()}
        return {
            names[id(p)]: float(group.get("lr_scale", 1.0))
            for group in self.optimizer.param_groups
            for p in group["params"]
            if id(p) in names
        }

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen base weights under plain module names (the adapter's tensors left out)."""
        if self.kind == "projected_full":
            return dict(self.model.state_dict())
        inner = self.model.get_base_model()
        tag = f".{self.adapter_name}"
        state = {
            key.replace(".base_layer.", "."): value
            for key, value in inner.state_dict().items()
            if f"{tag}." not in key and not key.endswith(tag)
        }
        if self.quantization is not None and self.quantization.base_dtype != "keep":
            # a quantized base (lock.base_dtype) is handed out dequantized, as the plain model's weights
            for name, layer in tuner_layers(self.model).items():
                base = layer.get_base_layer()
                if not is_quantized(base):
                    continue
                for key in [k for k in state if k.startswith(f"{name}.") and k != f"{name}.bias"]:
                    del state[key]
                state[f"{name}.weight"] = dense_weight(base, self.quantization.original_dtype)
        return state

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's effective weights under plain module names (base + ΔW for every adapted module)."""
        merged = self.base_state_dict()
        if self.kind == "projected_full":
            return merged
        for name, layer in tuner_layers(self.model).items():
            key = f"{name}.weight"
            merged[key] = merged[key] + layer.get_delta_weight(self.adapter_name).to(merged[key].dtype)
        return merged


def tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every PEFT tuner layer (subspace-locked, LoRA, ...) of ``model`` by base module name, sorted."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = {base_module_name(n): m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    return {name: found[name] for name in sorted(found)}


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
    optimizer: str = "factored",
    base_dtype: str = "keep",
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
        optimizer: one of :data:`COEFFICIENT_OPTIMIZERS`: ``coefficients`` (:class:`LockedAdamW`, Adam on each
            coefficient) or ``factored`` (:class:`FactoredSubspaceAdamW`, W-space Adam's step with a factored second
            moment).
        base_dtype: keep the locked matrices' frozen weights as they are (``"keep"``) or round them to ``"bf16"``,
            ``"int8"`` or ``"nf4"`` first (``quantization.quantize_linears``; the loss is reported in
            the phase's ``quantization``); the coefficients stay float32.
    """
    import peft

    if optimizer not in COEFFICIENT_OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not one of {list(COEFFICIENT_OPTIMIZERS)}.")

    modes = {basis.mode for basis in bases.values()}
    if len(modes) != 1:
        raise ValueError(f"enter_locked_phase: the bases mix lock modes {sorted(modes)}; lock with one mode.")
    (mode,) = modes
    check_lock_mode(mode, "lock mode")
    ranks = {basis.rank for basis in bases.values()}
    if len(ranks) != 1:
        raise ValueError(f"enter_locked_phase: the bases have different ranks {sorted(ranks)}; use one rank.")
    quantization = quantize_linears(model, bases, base_dtype)
    config = SubspaceLockedConfig(r=ranks.pop(), mode=mode, target_modules=list(bases), basis_path=str(basis_path))
    peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
    coefficients = locked_coefficients(peft_model, adapter_name)
    # one copy of U and V: the adapter's own buffers (read from basis_path), not a second set held by the optimizer
    bases = adapter_bases(peft_model, bases, adapter_name)
    carry = carry if carry is not None else WarmupCarry()
    if optimizer == "factored":
        built = FactoredSubspaceAdamW.from_carry(coefficients, bases, carry, lr=lr, betas=betas, eps=eps)
    else:
        built = LockedAdamW.from_carry(coefficients, carry, mode=mode, lr=lr, betas=betas, eps=eps)
    return LockedPhase(peft_model, built, bases, adapter_name, quantization=quantization)


def adapter_bases(
    peft_model: nn.Module, expected: Mapping[str, SubspaceBasis], adapter_name: str = ADAPTER_NAME
) -> dict[str, SubspaceBasis]:
    """The :class:`SubspaceBasis` of each locked layer of ``peft_model``, viewing the adapter's own ``U``/``V``
    buffers (no copy), sorted by module name; checked against ``expected`` (the bases the adapter was built from).
    A right-sided adapter holds no ``U`` and neither do its bases: the basis file keeps it (a two-sided lock can
    start from that file), memory does not (it would be out x r per matrix, as much as the coefficients).

    Raises:
        ValueError: a module of ``expected`` has no locked layer, or its buffers differ from ``expected`` (the basis
            file does not hold the bases passed in: write the file from them).
    """
    layers = locked_layers(peft_model)
    missing = sorted(set(expected) - set(layers))
    if missing:
        raise ValueError(f"no subspace-locked layer for {missing[:3]}: wrap the model with these target modules.")
    out = {}
    for name in sorted(expected):
        basis = layers[name].basis(adapter_name)
        if basis.V.shape != expected[name].V.shape or not torch.equal(basis.V, expected[name].V.to(basis.V)):
            raise ValueError(
                f"{name}: the adapter's V (read from the basis file) differs from the basis passed in; write the "
                "basis file from the same bases."
            )
        out[name] = SubspaceBasis(basis.V, basis.U, basis.mode)
    return out


def enter_lora_phase(
    model: nn.Module,
    target_names: Sequence[str],
    rank: int,
    *,
    lr: float,
    alpha: float | None = None,
    lr_scale: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    adapter_name: str = ADAPTER_NAME,
) -> LockedPhase:
    """The LoRA baseline: PEFT LoRA of ``rank`` on the exact modules ``target_names`` (fresh, B = 0), trained by
    ``torch.optim.AdamW`` at ``lr · lr_scale`` (one group carrying ``lr_scale``). Nothing carries over from the
    warmup optimizer: LoRA's factors have no coordinates in common with W's."""
    import peft

    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=0.0, target_modules=list(target_names)
    )
    peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    group = {"params": params, "lr": lr * lr_scale, "lr_scale": float(lr_scale)}
    optimizer = torch.optim.AdamW([group], lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0, foreach=False)
    return LockedPhase(peft_model, optimizer, {}, adapter_name, kind="lora")


@torch.no_grad()
def enter_projected_phase(
    model: nn.Module,
    bases: Mapping[str, SubspaceBasis],
    warmup_optimizer: torch.optim.Optimizer | None,
    *,
    lr: float,
    lr_scale: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> LockedPhase:
    """The ``projected_full`` reference (benchmarks only): the locked matrices' full weights keep training with
    full-size W-space AdamW moments (carried from ``warmup_optimizer`` unchanged) of the projected gradient, and every
    update is projected onto the subspace (:class:`LockedAdamW` with ``moment_space="weight"``). Full memory."""
    weights = {name: model.get_submodule(name).weight for name in sorted(bases)}
    freeze_all_but(model, weights.values())
    groups = [
        {
            "params": [w],
            "basis": [(bases[name].U, bases[name].V)],
            "projection": bases[name].mode,
            "moment_space": "weight",
            "lr": lr * lr_scale,
            "lr_scale": float(lr_scale),
            "param_names": [name],
        }
        for name, w in weights.items()
    ]
    optimizer = LockedAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if warmup_optimizer is not None:
        for w in weights.values():
            state = adam_state_fp32(warmup_optimizer.state.get(w, {}))
            if state:
                optimizer.state[w].update(
                    step=torch.tensor(float(state["step"]), dtype=torch.float32),
                    exp_avg=state["exp_avg"].detach().clone(),
                    exp_avg_sq=state["exp_avg_sq"].detach().clone(),
                )
    return LockedPhase(model, optimizer, {name: bases[name] for name in sorted(bases)}, kind="projected_full")


def load_locked_phase(
    model: nn.Module,
    basis_path: str | os.PathLike,
    *,
    lr: float,
    mode: str = "right",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    adapter_name: str = ADAPTER_NAME,
    optimizer: str = "factored",
) -> LockedPhase:
    """:func:`enter_locked_phase` from the files a lock wrote: the basis and, when present, its warmup carry.

    Without a carry file (e.g. a basis from another source) the coefficient optimizer starts fresh with scale 1.
    """
    bases, _ = SubspaceBasis.load_all(basis_path, mode=mode)
    carry_path = carry_path_for(basis_path)
    carry = WarmupCarry.load(carry_path) if carry_path.is_file() else None
    return enter_locked_phase(model, bases, basis_path, carry, lr=lr, betas=betas, eps=eps, adapter_name=adapter_name,
                              optimizer=optimizer)  # fmt: skip


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
        if isinstance(phase.optimizer, FactoredSubspaceAdamW):
            m, v = phase.optimizer.lifted_moments(name, coefficients[name])
        else:
            m, v = phase.bases[name].lift_moments(state["exp_avg"], state["exp_avg_sq"])
        param = targets[name]
        step = state["step"]
        optimizer.state[param] = {
            "step": step.clone() if torch.is_tensor(step) else torch.tensor(float(step)),
            "exp_avg": m.to(param.dtype),
            "exp_avg_sq": v.to(param.dtype),
        }
    return model, optimizer


def load_preset_bases(
    path: str | Path, mode: str, rank: int, shapes: dict[str, tuple[int, int]]
) -> dict[str, SubspaceBasis]:
    """Read ``lock.basis_path`` and check it against the run's target matrices: one basis for every target (a
    matrix without one would stay frozen, untrained), none for another module, the run's rank, fitting shapes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"lock.basis_path {path} does not exist; give the basis.safetensors of an earlier run, or leave "
            "lock.basis_path unset to track the subspace during warmup."
        )
    bases, _ = SubspaceBasis.load_all(path, mode=mode)
    missing, extra = sorted(set(shapes) - set(bases)), sorted(set(bases) - set(shapes))
    if missing or extra:
        what = []
        if missing:
            what.append(f"no basis for {len(missing)} of the {len(shapes)} target matrices (e.g. {missing[0]}), "
                        "which would stay untrained")  # fmt: skip
        if extra:
            what.append(f"bases for {len(extra)} modules that are not targets (e.g. {extra[0]})")
        raise ValueError(
            f"lock.basis_path {path} has {' and '.join(what)}; use the basis of a run with the same student and "
            "lock.target_modules."
        )
    ranks = sorted({basis.rank for basis in bases.values()})
    if ranks != [rank]:
        raise ValueError(f"lock.basis_path {path} has rank {ranks} but lock.rank={rank}; set lock.rank={ranks[0]}.")
    for name, basis in bases.items():
        basis.validate(f"{path}:{name}", *shapes[name])
    return bases
