"""AdamW for training inside a locked subspace: on adapter coefficients, or on full weights with a basis.

Two ways to train only inside a frozen basis (V in x r, optionally U out x r, orthonormal columns):

* coefficient mode (params without a basis): the trainable tensors are adapter coefficients, A (out x r) with
  ΔW = A·Vᵀ ("right") or C (r x r) with ΔW = U·C·Vᵀ ("two_sided").  The optimizer is then exactly AdamW
  (same arithmetic as ``torch.optim.AdamW(foreach=False)``).  `LockedAdamW.from_carry` builds it so that it
  continues the warmup's full-parameter AdamW without a jump (see `project_adam_moments`).
* projected mode (params with a basis, full weights W kept trainable): the gradient is mapped to r-dim
  coordinates, g = G·V ("right", out x r) or g = Uᵀ·G·V ("two_sided", r x r); Adam's moments live in those
  coordinates and the normalized step is mapped back, ΔW = -lr·ŝ·Vᵀ or -lr·U·ŝ·Vᵀ.  The whole update,
  decoupled weight decay included (W ← W - lr·wd·W·V·Vᵀ or -lr·wd·U·Uᵀ·W·V·Vᵀ), stays in the subspace;
  projecting only the gradient would not, since Adam's per-element scaling leaves the subspace.  With V
  (and U) the identity this is exactly AdamW.  A group with ``moment_space="weight"`` keeps full-size W-space
  moments of the projected gradient P(G) instead and projects the normalised step, ΔW = -lr·P(m̂/(√v̂+ε)): Adam's
  per-coordinate scaling in W's own coordinates (memory of full AdamW; the benchmark's ``projected_full`` upper
  bound).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from ..runtime.distributed import shard_like
from ..subspace.basis import LOCK_MODES, SubspaceBasis, change_moment_basis, check_lock_mode, check_orthonormal
from .carry import WarmupCarry
from .closure import evaluate_closure

__all__ = ["LockedAdamW", "change_moment_basis", "project_adam_moments"]

PROJECTIONS = LOCK_MODES
_GROUP_KEYS = frozenset(
    {"params", "lr", "lr_scale", "betas", "eps", "weight_decay", "projection", "moment_space", "basis", "param_names"}
)
_MOMENT_POLICIES = ("project", "reset")
MOMENT_SPACES = ("subspace", "weight")


def project_adam_moments(
    exp_avg: Tensor, exp_avg_sq: Tensor, V: Tensor, U: Tensor | None = None, grad_scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Project full-weight Adam moments (out x in) onto a basis: right m_A = m_W·V, v_A = v_W·(V∘V);
    two_sided (U given) m_C = Uᵀ·m_W·V, v_C = (U∘U)ᵀ·v_W·(V∘V).  With ΔW = s·A·Vᵀ the coefficient gradient is
    s·G·V, hence the factors s and s² (`grad_scale` = s).  See `SubspaceBasis.reduce_moments`.
    """
    basis = SubspaceBasis(V, U, "right" if U is None else "two_sided")
    return basis.reduce_moments(exp_avg, exp_avg_sq, grad_scale)


def _check_number(name: str, value, low: float, high: float | None = None, high_open: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < low or (high is not None and (value >= high if high_open else value > high)):
        raise ValueError(f"invalid {name}: {value!r}")


def _check_hparams(group: Mapping) -> None:
    if "lr" in group:
        _check_number("lr", group["lr"], 0.0)
    if "eps" in group:
        _check_number("eps", group["eps"], 0.0)
    if "weight_decay" in group:
        _check_number("weight_decay", group["weight_decay"], 0.0)
    if "betas" in group:
        betas = group["betas"]
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"betas must be a pair, got {betas!r}")
        _check_number("betas[0]", betas[0], 0.0, 1.0)
        _check_number("betas[1]", betas[1], 0.0, 1.0)
    if "moment_space" in group and group["moment_space"] not in MOMENT_SPACES:
        raise ValueError(f"moment_space must be one of {MOMENT_SPACES}, got {group['moment_space']!r}")
    if "projection" in group and group["projection"] not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {group['projection']!r}")


def _parse_basis(entry) -> tuple[Tensor | None, Tensor | None]:
    """A basis entry is None, V, (U, V) or {"V": V, "U": U (optional)}; returns (U, V)."""
    if entry is None:
        return None, None
    if isinstance(entry, Tensor):
        return None, entry
    if isinstance(entry, tuple | list) and len(entry) == 2:
        return entry[0], entry[1]
    if isinstance(entry, Mapping):
        unknown = set(entry) - {"U", "V"}
        if unknown or "V" not in entry:
            raise ValueError(f"a basis dict needs key 'V' and optionally 'U'; got keys {sorted(entry)}")
        return entry.get("U"), entry["V"]
    raise ValueError(f"a basis entry must be None, V, (U, V) or {{'V': V, 'U': U}}; got {type(entry).__name__}")


def _check_basis_matrix(what: str, m: Tensor, dim: int) -> None:
    if not isinstance(m, Tensor) or m.dim() != 2 or not m.dtype.is_floating_point:
        raise ValueError(f"{what} must be a 2-D floating tensor")
    if m.shape[0] != dim or not 1 <= m.shape[1] <= dim:
        raise ValueError(f"{what} has shape {tuple(m.shape)}; expected ({dim}, r) with 1 <= r <= {dim}")
    check_orthonormal(what, m)


class LockedAdamW(torch.optim.Optimizer):
    """AdamW whose updates stay inside a locked subspace (see the module docstring for both modes).

    Args:
        params: tensors or param groups.  A group may carry ``basis``: a list aligned with ``params`` whose
            entries are None (plain AdamW), V (in x r), (U, V) or {"V": V, "U": U}; and ``projection``:
            "right" (default; uses V only, U is ignored) or "two_sided" (needs U and V).  Bases can also be
            set later with `set_basis`.  Unknown group keys or option values raise ValueError.
        lr, betas, eps, weight_decay: as in torch.optim.AdamW (decoupled weight decay).
        projection: default projection of groups that do not name one.

    Bases are held in optimizer state as float tensors (``state[p]["V"]``, ``state[p]["U"]``, dtype
    promote(param dtype, float32)), with the low-rank moments in the same dtype, so ``state_dict()`` holds
    only tensors and round-trips exactly (including for bf16 params) and resuming reproduces the run.
    Which params are projected is decided by the presence of a basis in state, not by the group.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        projection: str = "right",
    ):
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "projection": projection,
        }
        _check_hparams(defaults)
        defaults["betas"] = tuple(betas)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups and bases
    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        unknown = set(group) - _GROUP_KEYS
        if unknown:
            raise ValueError(f"unknown param group option(s) {sorted(unknown)}; allowed: {sorted(_GROUP_KEYS)}")
        _check_hparams(group)
        basis = group.pop("basis", None)
        super().add_param_group(group)
        if basis is None:
            return
        params = self.param_groups[-1]["params"]
        if not isinstance(basis, list | tuple) or len(basis) != len(params):
            raise ValueError(f"'basis' must be a list aligned with 'params' ({len(params)} entries)")
        for p, entry in zip(params, basis):
            U, V = _parse_basis(entry)
            if V is not None:
                self.set_basis(p, V, U)

    def _group_of(self, param: Tensor) -> dict:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise ValueError("param is not managed by this optimizer")

    @torch.no_grad()
    def set_basis(self, param: Tensor, V: Tensor | None, U: Tensor | None = None, moments: str = "project") -> None:
        """Set (or with V=None remove) the basis of a 2-D param.

        Existing Adam moments are never left stale.  ``moments="project"`` (default) carries them into the
        new coordinates with `change_moment_basis` (m exact for the in-subspace part, v under the diagonal
        approximation) and keeps the step count; this covers full → subspace (the warmup transfer
        m·V, v·(V∘V)), subspace → subspace (m·V_oldᵀ·V_new, ...) and subspace → full (V=None: m·V_oldᵀ, ...).
        ``moments="reset"`` drops moments and step count (Adam restarts, bias correction included).
        With projection "right" U is ignored; "two_sided" requires U.
        """
        if moments not in _MOMENT_POLICIES:
            raise ValueError(f"moments must be one of {_MOMENT_POLICIES}, got {moments!r}")
        group = self._group_of(param)
        projection = group["projection"]
        state = self.state[param]
        new_u = new_v = None
        cdt = torch.promote_types(param.dtype, torch.float32)
        if V is not None:
            if param.dim() != 2:
                raise ValueError(f"only 2-D params can have a basis, got shape {tuple(param.shape)}")
            _check_basis_matrix("V", V, param.shape[1])
            new_v = V.detach().to(device=param.device, dtype=cdt).clone()
            if projection == "two_sided":
                if U is None:
                    raise ValueError("projection 'two_sided' needs U as well as V")
                _check_basis_matrix("U", U, param.shape[0])
                new_u = U.detach().to(device=param.device, dtype=cdt).clone()
            elif projection != "right":
                raise ValueError(f"unknown projection {projection!r}")
        old_u, old_v = state.get("U"), state.get("V")
        if "exp_avg" in state and group.get("moment_space", "subspace") == "weight":
            if moments == "reset":  # weight-space moments are full-size whatever the basis: only a reset changes them
                for key in ("step", "exp_avg", "exp_avg_sq"):
                    state.pop(key, None)
        elif "exp_avg" in state:
            if moments == "reset":
                for key in ("step", "exp_avg", "exp_avg_sq"):
                    state.pop(key, None)
            else:
                # old coordinates g_old = L1ᵀ·G·R1, new g_new = L2ᵀ·G·R2 (None = identity); G ≈ L1·g_old·R1ᵀ
                left = _product(None if new_u is None else new_u.mT, old_u)
                right = _product(None if old_v is None else old_v.mT, new_v)
                m, v = change_moment_basis(state["exp_avg"], state["exp_avg_sq"], left=left, right=right)
                mdt = param.dtype if new_v is None else cdt
                state["exp_avg"], state["exp_avg_sq"] = m.to(mdt), v.to(mdt)
        state.pop("U", None)
        state.pop("V", None)
        if new_v is not None:
            state["V"] = new_v
        if new_u is not None:
            state["U"] = new_u

    def get_basis(self, param: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Return (U, V) held for `param` (None where absent)."""
        state = self.state.get(param, {})
        return state.get("U"), state.get("V")

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            projection = group["projection"]
            if projection not in PROJECTIONS:
                raise ValueError(f"unknown projection {projection!r}")
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LockedAdamW does not support sparse gradients")
                state = self.state[p]
                if "V" in state:
                    self._projected_step(p, state, group, projection)
                else:
                    self._plain_step(p, state, group)
        return loss

    @staticmethod
    def _adam(state: dict, grad: Tensor, group: dict) -> tuple[Tensor, Tensor, float]:
        """Update moments in place; return (exp_avg, denom, step_size) exactly as torch's single-tensor AdamW."""
        beta1, beta2 = group["betas"]
        if "exp_avg" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if exp_avg.shape != grad.shape:
            raise RuntimeError(f"moment shape {tuple(exp_avg.shape)} does not match gradient {tuple(grad.shape)}")
        state["step"] += 1
        step = float(state["step"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        return exp_avg, denom, group["lr"] / bias_correction1

    def _plain_step(self, p: Tensor, state: dict, group: dict) -> None:
        if group["weight_decay"] != 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        exp_avg, denom, step_size = self._adam(state, p.grad, group)
        p.addcdiv_(exp_avg, denom, value=-step_size)

    def _projected_step(self, p: Tensor, state: dict, group: dict, projection: str) -> None:
        basis = SubspaceBasis(state["V"], state.get("U"), projection)
        V = state["V"]
        if group.get("moment_space", "subspace") == "weight":
            self._weight_moment_step(p, state, group, basis)
            return
        grad_low = basis.reduce(p.grad.to(V.dtype))
        if group["weight_decay"] != 0:
            # W - a·P(W) written as (1 - a)·W + a·(W - P(W)): the same value, and with a full basis (P = id) the
            # residual is exactly 0, so the result is bit-identical to AdamW's W·(1 - a)
            decay = group["lr"] * group["weight_decay"]
            outside = (p.to(V.dtype) - basis.project(p.to(V.dtype))).to(p.dtype)
            p.mul_(1 - decay).add_(outside, alpha=decay)
        exp_avg, denom, step_size = self._adam(state, grad_low, group)
        # (-step_size·m)/denom: the evaluation order of torch's addcdiv, so a full basis reproduces AdamW bitwise
        p.add_(basis.lift(exp_avg.mul(-step_size).div_(denom)).to(p.dtype))

    def _weight_moment_step(self, p: Tensor, state: dict, group: dict, basis: SubspaceBasis) -> None:
        """AdamW with full-size W-space moments of the projected gradient; the update is projected again."""
        V = state["V"]
        if group["weight_decay"] != 0:
            decay = group["lr"] * group["weight_decay"]
            p.sub_(basis.project(p.to(V.dtype)).to(p.dtype), alpha=decay)
        exp_avg, denom, step_size = self._adam(state, basis.project(p.grad.to(V.dtype)), group)
        p.add_(basis.project(exp_avg.mul(-step_size).div_(denom)).to(p.dtype))

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but bases and low-rank moments keep their saved dtype (torch would cast them to the
        param's dtype, e.g. bf16)."""
        super().load_state_dict(state_dict)
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for sid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(sid)
            if saved is None or "V" not in saved:
                continue
            for key in ("U", "V", "exp_avg", "exp_avg_sq"):
                if key in saved:
                    self.state[p][key] = saved[key].detach().to(device=p.device, dtype=saved[key].dtype).clone()

    # ------------------------------------------------------------------ warmup continuation
    @classmethod
    @torch.no_grad()
    def from_carry(
        cls,
        coefficients: Mapping[str, Tensor],
        carry: WarmupCarry,
        mode: str = "right",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> LockedAdamW:
        """Coefficient-mode optimizer that continues the warmup from a :class:`WarmupCarry`.

        One param group per module (in the order of ``coefficients``), each with ``lr_scale`` = the carry's scale
        and ``lr`` = ``lr · lr_scale``, so both a loop that sets ``group["lr"] = lr_t · group["lr_scale"]`` every
        step and a scheduler that multiplies each group's initial lr keep the scale. Each coefficient tensor starts
        from the carried step count and moments (a fresh state where the carry has none).
        """
        check_lock_mode(mode)
        unknown = sorted(set(carry.lr_scales) - set(coefficients))
        if unknown:
            raise ValueError(f"the warmup carry names modules without coefficients: {unknown[:5]}")
        groups = []
        for name, coef in coefficients.items():
            scale = float(carry.lr_scales.get(name, 1.0))
            groups.append({"params": [coef], "lr": lr * scale, "lr_scale": scale, "param_names": [name]})
        opt = cls(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, projection=mode)
        opt._load_carried_moments(coefficients, carry)
        return opt

    @torch.no_grad()
    def _load_carried_moments(self, coefficients: Mapping[str, Tensor], carry: WarmupCarry) -> None:
        """Start each coefficient tensor from the carry's step count and moments (fresh where it has none)."""
        for name, coef in coefficients.items():
            if name not in carry.steps:
                continue
            m, v = carry.exp_avg[name], carry.exp_avg_sq[name]
            if tuple(m.shape) != tuple(coef.shape):
                raise ValueError(
                    f"{name}: carried moments have shape {tuple(m.shape)} but the coefficients {tuple(coef.shape)}; "
                    "the carry was taken for another mode or rank."
                )
            self.state[coef] = {  # (sharded like the coefficients when FSDP2 shards them)
                "step": torch.tensor(carry.steps[name], dtype=torch.float32),
                "exp_avg": shard_like(m.to(device=coef.device, dtype=coef.dtype).contiguous(), coef),
                "exp_avg_sq": shard_like(v.to(device=coef.device, dtype=coef.dtype).contiguous(), coef),
            }


def _product(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """a @ b where None is the identity."""
    if a is None:
        return b
    if b is None:
        return a
    return a @ b
