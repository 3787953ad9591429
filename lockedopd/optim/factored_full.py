"""Full-parameter AdamW with an Adafactor-factored second moment: the locked optimizer's family, without the lock.

:class:`~lockedopd.optim.FactoredSubspaceAdamW` (the lock's default optimizer) takes W-space Adam steps of the
projected gradient with the second moment kept as row and column sums. Comparing it with full OPD trained by plain
AdamW mixes two changes (the subspace and the optimizer); :class:`FactoredAdamW` (``optimizer: factored``) is the
matched full-parameter reference — the same step with no projection:

* first moment m_W per weight, as AdamW;
* second moment of each matrix kept as its row sums R (out) and column sums C (in) of g∘g, EMA'd with β₂;
  v̂_ij ≈ R̂_i·Ĉ_j / ΣR̂ (Adafactor's rank-1 factorisation, without Adafactor's update clipping or relative step);
* step = m̂ ⊘ ((√R̂ + ε) ⊗ (√(Ĉ/ΣR̂) + ε)), decoupled weight decay, as the subspace optimizer does (ε floors each
  factor), so with a basis spanning all of W it equals :class:`~lockedopd.optim.FactoredSubspaceAdamW`.

Tensors that are not matrices (biases, norms) keep a full second moment (plain AdamW).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .closure import evaluate_closure
from .factored import TINY

__all__ = ["FactoredAdamW"]


class FactoredAdamW(torch.optim.Optimizer):
    """AdamW whose second moment of every matrix is factored into row and column sums (Adafactor-style).

    Args:
        params: the parameters (or param groups) to train.
        lr / betas / eps / weight_decay: as :class:`torch.optim.AdamW` (decoupled weight decay).

    State per matrix: ``step``, ``exp_avg`` (its shape), ``row_sq`` (out) and ``col_sq`` (in); per other tensor:
    ``step``, ``exp_avg``, ``exp_avg_sq``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr > 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or not eps >= 0 or weight_decay < 0:
            raise ValueError(
                f"FactoredAdamW: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}."
            )
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        """One factored AdamW step for every parameter with a gradient."""
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("FactoredAdamW does not take sparse gradients; use dense embeddings.")
                dtype = torch.promote_types(p.dtype, torch.float32)
                g = p.grad.to(dtype)
                state = self.state[p]
                factored = p.dim() == 2
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(g)
                    if factored:
                        state["row_sq"] = torch.zeros(g.shape[0], dtype=dtype, device=g.device)
                        state["col_sq"] = torch.zeros(g.shape[1], dtype=dtype, device=g.device)
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(g)
                state["step"] += 1
                t = float(state["step"])
                state["exp_avg"].lerp_(g, 1 - beta1)
                m_hat = state["exp_avg"] / (1 - beta1**t)
                bias2 = 1 - beta2**t
                if factored:
                    square = g.square()
                    state["row_sq"].mul_(beta2).add_(square.sum(dim=1), alpha=1 - beta2)
                    state["col_sq"].mul_(beta2).add_(square.sum(dim=0), alpha=1 - beta2)
                    row = (state["row_sq"] / bias2).clamp_min(TINY)
                    col = (state["col_sq"] / bias2).clamp_min(TINY)
                    row_d, col_d = row.sqrt(), (col / row.sum()).sqrt()
                    update = m_hat / (row_d + group["eps"]).unsqueeze(1) / (col_d + group["eps"]).unsqueeze(0)
                else:
                    state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    update = m_hat / ((state["exp_avg_sq"] / bias2).sqrt() + group["eps"])
                if group["weight_decay"] != 0:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss
