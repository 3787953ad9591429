"""W-space Adam inside a locked subspace, kept at coefficient size: a factored second moment (Adafactor-style).

Adam on the coefficients A (ΔW = A·Vᵀ) normalises each coefficient on its own, so each of the r basis directions of a
row moves by about the same amount, however little of the gradient it carries — coordinates of A are not
coordinates of W. Projected full AdamW (``lock.optimizer=projected_full``; a scratch probe before lockedopd) does
what full OPD does instead: W-space moments of the projected gradient g_W = P(G), the update m̂_W ⊘ √v̂_W projected
onto the subspace. It needs two W-sized moments per matrix.

:class:`FactoredSubspaceAdamW` takes that step with O(r·out + out + in) state per matrix:

* the first moment lives in coefficient space exactly (m_W = lift(m_A), since the lift is linear);
* the second moment v_W is kept as its row sums R (out) and column sums C (in), v̂_W ≈ R·Cᵀ / ΣR (Adafactor's
  rank-1 factorisation). Both sums of g_W∘g_W are exact and cheap from the coefficient gradient g: with
  g_W = B·Vᵀ (B = g, or U·g two-sided), R = rowsum(B∘B) and C = diag(V·BᵀB·Vᵀ);
* the projected step reduce(m̂_W ⊘ (√R̂ ⊗ √(Ĉ/ΣR̂))) = [Uᵀ] · diag(R̂^-½) · B_m · (Vᵀ diag((Ĉ/ΣR̂)^-½) V) needs only
  r x r and out x r products — no W-sized tensor exists, not even transiently.

Its steps have W-space Adam's size, so it continues the warmup at the warmup's learning rate (``lr_scale`` 1), and
it starts from the warmup AdamW's moments: m_A = reduce(m_W) and the row and column sums of v_W
(:class:`lockedopd.optim.WarmupCarry`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..subspace.basis import SubspaceBasis
from .carry import WarmupCarry
from .closure import evaluate_closure

__all__ = ["FactoredSubspaceAdamW"]

TINY = 1e-30  # floor of the second-moment factors: a row or column whose gradient was always 0 takes no step


class FactoredSubspaceAdamW(torch.optim.Optimizer):
    """Projected W-space AdamW with an Adafactor-factored second moment, on subspace coefficients.

    Args:
        coefficients: module name → the trainable coefficient tensor (A: out x r right-sided, C: r x r two-sided).
        bases: module name → its :class:`SubspaceBasis` (V, and U two-sided); the bases stay fixed.
        out_features: module name → rows of the locked weight W (needed two-sided, where C does not show it).
        lr / betas / eps / weight_decay: as AdamW; ``eps`` floors the step's denominator, weight decay is decoupled
            and acts on the coefficients (it shrinks ΔW, not W).
        lr_scales: module name → learning-rate multiplier; each matrix gets a param group with ``lr = lr · scale``
            and key ``lr_scale`` (as :meth:`lockedopd.LockedAdamW.from_carry` does).

    State per coefficient tensor: ``step``, ``exp_avg`` (its shape), ``row_sq`` (out) and ``col_sq`` (in).

    Under FSDP2 the coefficients (right-sided A, out x r) are ``DTensor`` shards split by rows; ``exp_avg`` and
    ``row_sq`` are split the same way (:attr:`row_sharded_state`) and ``col_sq`` stays whole on every process. The
    two sums over all rows the step needs — the r x r Gram AᵀA of the gradient, which gives the column sums, and
    ΣR — are all-reduced over the shards' process group, so every process takes the unsharded step on its rows.
    """

    row_sharded_state = ("exp_avg", "row_sq")
    """State keys split by rows like the coefficients under FSDP2 (``fsdp.shard_optimizer_state``)."""

    def __init__(
        self,
        coefficients: Mapping[str, Tensor],
        bases: Mapping[str, SubspaceBasis],
        out_features: Mapping[str, int] | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        lr_scales: Mapping[str, float] | None = None,
    ) -> None:
        if set(coefficients) != set(bases):
            differ = sorted(set(coefficients) ^ set(bases))
            raise ValueError(f"coefficients and bases name different modules: {differ}")
        if not lr > 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or not eps >= 0 or weight_decay < 0:
            raise ValueError(f"FactoredSubspaceAdamW: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay.")
        groups = []
        for name, coef in coefficients.items():
            scale = float((lr_scales or {}).get(name, 1.0))
            groups.append({"params": [coef], "lr": lr * scale, "lr_scale": scale, "param_names": [name]})
        super().__init__(groups, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.bases = {name: bases[name] for name in coefficients}
        self.out_features = {}
        for name, coef in coefficients.items():
            basis = bases[name]
            rows = basis.U.shape[0] if basis.two_sided else coef.shape[0]
            if out_features is not None and name in out_features and out_features[name] != rows:
                raise ValueError(f"{name}: out_features {out_features[name]} but the basis/coefficients give {rows}.")
            if tuple(coef.shape) != basis.coefficient_shape(rows):
                raise ValueError(f"{name}: coefficients {tuple(coef.shape)} do not fit the basis ({basis.mode}).")
            self.out_features[name] = rows

    @classmethod
    def from_carry(
        cls,
        coefficients: Mapping[str, Tensor],
        bases: Mapping[str, SubspaceBasis],
        carry: WarmupCarry,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> FactoredSubspaceAdamW:
        """Continue the warmup: step count, m_A and the row/column sums of v_W from ``carry`` (fresh where absent).

        The carry's lr scales are used as given; ``lock.lr_scale=auto`` gives 1 for this optimizer (its steps
        already have W-space Adam's size).
        """
        opt = cls(coefficients, bases, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                  lr_scales=carry.lr_scales)  # fmt: skip
        for name, coef in coefficients.items():
            if name not in carry.steps:
                continue
            m = carry.exp_avg[name]
            if tuple(m.shape) != tuple(coef.shape):
                raise ValueError(
                    f"{name}: carried moments {tuple(m.shape)} do not fit coefficients {tuple(coef.shape)}"
                )
            dtype = torch.promote_types(coef.dtype, torch.float32)
            opt.state[coef] = {
                "step": torch.tensor(carry.steps[name], dtype=torch.float32),
                "exp_avg": m.to(device=coef.device, dtype=dtype).clone(),
                "row_sq": carry.row_sq[name].to(device=coef.device, dtype=dtype).clone(),
                "col_sq": carry.col_sq[name].to(device=coef.device, dtype=dtype).clone(),
            }
        return opt

    def _name_of(self, group: dict) -> str:
        return group["param_names"][0]

    @torch.no_grad()
    def step(self, closure=None):
        """One projected, factored W-space Adam step for every coefficient tensor with a gradient."""
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            (p,) = group["params"]
            if p.grad is None:
                continue
            name = self._name_of(group)
            basis = self.bases[name]
            state = self.state[p]
            dtype = torch.promote_types(p.dtype, torch.float32)
            V = basis.V.to(device=p.device, dtype=dtype)
            U = basis.U.to(device=p.device, dtype=dtype) if basis.two_sided else None
            rows = _RowShards.of(p, two_sided=U is not None)  # FSDP2: this process's rows; else the whole tensor
            g = rows.local(p.grad).to(dtype)
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = rows.zeros_like(p.grad, g)
                state["row_sq"] = rows.split(torch.zeros(self.out_features[name], dtype=dtype, device=g.device))
                state["col_sq"] = torch.zeros(V.shape[0], dtype=dtype, device=g.device)
            exp_avg, row_sq = rows.local(state["exp_avg"]), rows.local(state["row_sq"])
            beta1, beta2 = group["betas"]
            state["step"] += 1
            t = float(state["step"])
            left = U @ g if U is not None else g  # g_W = left · Vᵀ
            exp_avg.lerp_(g, 1 - beta1)
            row_sq.mul_(beta2).add_(left.square().sum(dim=1), alpha=1 - beta2)
            gram = rows.sum(left.mT @ left)  # r x r, over all rows
            state["col_sq"].mul_(beta2).add_(((V @ gram) * V).sum(dim=1), alpha=1 - beta2)
            bias2 = 1 - beta2**t
            row = (row_sq / bias2).clamp_min(TINY)
            col = (state["col_sq"] / bias2).clamp_min(TINY)
            row_d = row.sqrt()
            col_d = (col / rows.sum(row.sum())).sqrt()  # √v̂_ij ≈ row_d_i · col_d_j
            kernel = (V / (col_d + group["eps"]).unsqueeze(1)).mT @ V  # Vᵀ diag(1/col_d) V: r x r
            m_hat = exp_avg / (1 - beta1**t)
            m_left = U @ m_hat if U is not None else m_hat
            update = (m_left / (row_d + group["eps"]).unsqueeze(1)) @ kernel  # out x r
            if U is not None:
                update = U.mT @ update
            weights = rows.local(p)
            if group["weight_decay"] != 0:
                weights.mul_(1 - group["lr"] * group["weight_decay"])
            weights.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss

    def lifted_moments(self, name: str, param: Tensor) -> tuple[Tensor, Tensor] | None:
        """The W-space moments this state stands for — (m_W, v̂_W-factored × bias) — for an unlock; ``None`` when
        the tensor never stepped."""
        state = self.state.get(param, {})
        if not state:
            return None
        basis = self.bases[name]
        m_w = basis.lift(state["exp_avg"])
        row, col = state["row_sq"], state["col_sq"]
        v_w = torch.outer(row, col) / row.sum().clamp_min(TINY)
        return m_w, v_w


class _RowShards:
    """How one coefficient tensor is laid out: whole (a plain tensor: every method is the identity, so the step is
    bit-identical to the unsharded code) or an FSDP2 ``DTensor`` split by rows over a process group."""

    def __init__(self, param: Tensor | None = None) -> None:
        self.param = param  # the sharded parameter (None: whole)

    @classmethod
    def of(cls, param: Tensor, two_sided: bool) -> _RowShards:
        from ..runtime.distributed import is_row_sharded

        if not is_row_sharded(param):
            return cls()
        if two_sided:
            raise ValueError(
                "FactoredSubspaceAdamW: two-sided coefficients (r x r) sharded by FSDP2 are not supported; use "
                "lock.mode=right with fsdp=true, or lock.optimizer=coefficients."
            )
        return cls(param)

    def local(self, tensor: Tensor) -> Tensor:
        """This process's rows of ``tensor`` (a view: in-place changes reach the shard)."""
        return tensor.to_local() if self.param is not None else tensor

    def zeros_like(self, grad: Tensor, local_grad: Tensor) -> Tensor:
        """A zero first moment laid out like the parameter (``local_grad``: its rows here, in the step's dtype)."""
        if self.param is None:
            return torch.zeros_like(local_grad)
        return torch.zeros_like(grad, dtype=local_grad.dtype)

    def split(self, tensor: Tensor) -> Tensor:
        """``tensor`` (whole, one entry per row) split by rows like the parameter (no communication)."""
        if self.param is None:
            return tensor
        from ..runtime.distributed import shard_like

        return shard_like(tensor, self.param)

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the processes that hold the rows (in place; identity when whole)."""
        if self.param is not None:
            torch.distributed.all_reduce(tensor, group=self.param.device_mesh.get_group())
        return tensor
