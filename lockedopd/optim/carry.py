"""What the locked phase inherits from the warmup's AdamW at the lock: moments in coefficient space and lr scales.

Both training loops lock the same way: :class:`lockedopd.OPDTrainer` takes the carry straight from its warmup
optimizer, and the TRL callback saves it next to the basis (``lock_state.safetensors``) so the locked run — a second
``Trainer`` — starts from it. Either way :meth:`lockedopd.LockedAdamW.from_carry` builds the coefficient optimizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..runtime.distributed import full_tensor
from ..runtime.quantization import adam_state_fp32
from ..subspace.basis import SubspaceBasis

__all__ = ["CARRY_FORMAT", "WarmupCarry", "lr_scale_from_adam_state"]

CARRY_FORMAT = "lockedopd.warmup_carry.v1"


def lr_scale_from_adam_state(state: Mapping[str, Tensor], basis: SubspaceBasis, betas: tuple, eps: float) -> float:
    """Learning-rate multiplier that keeps projected full AdamW's W-space step size for one locked matrix.

    Adam moves every coordinate it trains by about lr per step. Full AdamW moves the out×in entries of W, and the
    share f of that step inside the subspace is what carries the locked run; coefficient AdamW moves only the out×r
    (or r×r) coefficients, so its W-space step is smaller by about √(f·numel(W)/numel(coef)). The scale is that ratio
    (at least 1), with f measured from the warmup's normalised step u = m̂/(√v̂+ε): f = ‖reduce(u)‖²/‖u‖².
    """
    if not state:
        return 1.0
    beta1, beta2 = betas
    t = float(state["step"])
    m_hat = state["exp_avg"].double() / (1 - beta1**t)
    v_hat = state["exp_avg_sq"].double() / (1 - beta2**t)
    u = m_hat / (v_hat.sqrt() + eps)
    reduced = basis.reduce(u)
    share = float(reduced.square().sum() / u.square().sum().clamp_min(1e-300))
    out_dim, in_dim = u.shape
    return max(1.0, (share * out_dim * in_dim / reduced.numel()) ** 0.5)


#: The tensors a carry file holds per module.
CARRIED_KEYS = ("exp_avg", "exp_avg_sq", "row_sq", "col_sq")


@dataclass
class WarmupCarry:
    """Per locked matrix: the warmup's Adam step count and moments in coefficient coordinates, and its lr scale.

    Attributes:
        steps: module name → Adam step count at the lock (matrices the warmup never stepped are absent).
        exp_avg / exp_avg_sq: module name → moments carried into coefficient space (see
            :meth:`SubspaceBasis.reduce_moments`).
        lr_scales: module name → learning-rate multiplier of its coefficients (every locked matrix has one).
        row_sq / col_sq: module name → the row sums (out) and column sums (in) of the warmup's full second moment
            v_W: what :class:`lockedopd.optim.FactoredSubspaceAdamW` continues from.
    """

    steps: dict[str, float] = field(default_factory=dict)
    exp_avg: dict[str, Tensor] = field(default_factory=dict)
    exp_avg_sq: dict[str, Tensor] = field(default_factory=dict)
    lr_scales: dict[str, float] = field(default_factory=dict)
    row_sq: dict[str, Tensor] = field(default_factory=dict)
    col_sq: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    @torch.no_grad()
    def from_optimizer(
        cls,
        optimizer: torch.optim.Optimizer,
        full_params: Mapping[str, Tensor],
        bases: Mapping[str, SubspaceBasis],
        lr_scale: float | str = "auto",
        grad_scale: float = 1.0,
    ) -> WarmupCarry:
        """Read the carry from a warmup AdamW over the full weights ``full_params[name]``.

        Args:
            optimizer: the warmup's ``torch.optim.AdamW``, an optimizer with the same state keys, or bitsandbytes'
                (8-bit) AdamW, whose moments are dequantized (:func:`lockedopd.runtime.quantization.adam_state_fp32`).
            full_params: module name → the weight W the warmup trained.
            bases: module name → its locked :class:`SubspaceBasis`.
            lr_scale: ``"auto"`` (per matrix, :func:`lr_scale_from_adam_state`) or one number for all matrices.
            grad_scale: s in ΔW = s·A·Vᵀ (the moments scale by s and s²).
        """
        missing = sorted(set(bases) - set(full_params))
        if missing:
            raise ValueError(f"WarmupCarry: full_params lacks modules {missing[:5]}.")
        group_of = {}
        for group in optimizer.param_groups:
            if group.get("amsgrad", False):
                raise ValueError("warmup optimizers with amsgrad=True are not supported; use plain AdamW.")
            for p in group["params"]:
                group_of[id(p)] = group
        carry = cls()
        for name in sorted(bases):
            basis, weight = bases[name], full_params[name]
            state = adam_state_fp32(optimizer.state.get(weight, {}))  # bitsandbytes' 8-bit moments dequantized
            state = {key: full_tensor(value) if torch.is_tensor(value) else value for key, value in state.items()}
            if state:  # (FSDP2-sharded moments are gathered above, one matrix at a time)
                if "V" in state:
                    raise ValueError(
                        f"{name}: the warmup optimizer already projected this weight; nothing to transfer"
                    )
                if not {"step", "exp_avg", "exp_avg_sq"} <= set(state):
                    raise ValueError(
                        f"{name}: warmup state has keys {sorted(state)}; need step/exp_avg/exp_avg_sq (AdamW)"
                    )
                carry.steps[name] = float(state["step"])
                carry.exp_avg[name], carry.exp_avg_sq[name] = basis.reduce_moments(
                    state["exp_avg"], state["exp_avg_sq"], grad_scale
                )
                v_full = state["exp_avg_sq"].to(torch.promote_types(state["exp_avg_sq"].dtype, torch.float32))
                carry.row_sq[name] = v_full.sum(dim=1) * (grad_scale * grad_scale)
                carry.col_sq[name] = v_full.sum(dim=0) * (grad_scale * grad_scale)
            if lr_scale == "auto":
                group = group_of.get(id(weight))
                if group is None:
                    raise ValueError(f"{name}: its weight is not managed by the warmup optimizer.")
                carry.lr_scales[name] = lr_scale_from_adam_state(state, basis, group["betas"], group["eps"])
            else:
                carry.lr_scales[name] = float(lr_scale)
        return carry

    def save(self, path: str | os.PathLike) -> Path:
        """Write the carry as one safetensors file (tensors + JSON metadata), atomically."""
        from lockedopd.runtime.checkpoint import atomic_save_safetensors

        tensors = {}
        for name in self.exp_avg:
            tensors[f"{name}.exp_avg"] = self.exp_avg[name].detach().cpu().contiguous()
            tensors[f"{name}.exp_avg_sq"] = self.exp_avg_sq[name].detach().cpu().contiguous()
        for name in self.row_sq:
            tensors[f"{name}.row_sq"] = self.row_sq[name].detach().cpu().contiguous()
            tensors[f"{name}.col_sq"] = self.col_sq[name].detach().cpu().contiguous()
        meta = {"format": CARRY_FORMAT, "steps": json.dumps(self.steps), "lr_scales": json.dumps(self.lr_scales)}
        path = Path(path)
        atomic_save_safetensors(tensors, path, meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> WarmupCarry:
        """Read a carry written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"warmup carry {path} does not exist; it is written at the lock, next to the basis."
            )
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != CARRY_FORMAT:
                raise ValueError(f"{path} is not a warmup carry file (format {meta.get('format')!r}, expected "
                                 f"{CARRY_FORMAT!r}).")  # fmt: skip
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        steps = {k: float(v) for k, v in json.loads(meta["steps"]).items()}
        carry = cls(steps=steps, lr_scales={k: float(v) for k, v in json.loads(meta["lr_scales"]).items()})
        for name in steps:
            missing = [f"{name}.{key}" for key in CARRIED_KEYS if f"{name}.{key}" not in tensors]
            if missing:
                raise ValueError(f"{path} lacks {missing[:3]}: it was not written by WarmupCarry.save; lock again.")
            carry.exp_avg[name] = tensors[f"{name}.exp_avg"]
            carry.exp_avg_sq[name] = tensors[f"{name}.exp_avg_sq"]
            carry.row_sq[name] = tensors[f"{name}.row_sq"]
            carry.col_sq[name] = tensors[f"{name}.col_sq"]
        return carry
