"""TrajectoryMonitor: does a locked run still follow the path unconstrained OPD would take?

Every ``every`` steps of the locked phase the trainer also computes the *unconstrained* gradient G of every
locked matrix on the current batch (it enables grads on the frozen base weights for that one backward pass and
frees them right after). The monitor then reports, per matrix and overall:

* ``captured_energy`` = ‖P(G)‖²/‖G‖², the share of the full gradient inside the locked subspace, with
  P(G) = G·V·Vᵀ (right mode) or U·Uᵀ·G·V·Vᵀ (two-sided);
* ``cosine_to_adam`` = cos(locked step, the step unconstrained AdamW would take from this gradient). The full
  Adam moments were dropped at the lock (that is the memory saving), so the reference is AdamW's step from a
  fresh state, −G/(|G|+ε), which is what the per-element scaling makes of this gradient;
* ``cosine_to_gradient`` = cos(locked step, −G);
* ``predicted_progress_share`` (in :meth:`TrajectoryMonitor.summary`): the first-order loss decrease the locked
  steps bought, Σ⟨−G, ΔW_locked⟩, over what the unconstrained reference steps −lr·G/(|G|+ε) would have bought,
  accumulated over the checks — an estimate of the share of unconstrained progress the locked phase keeps;
* ``next_batch_progress_share``: the same ratio scored out of sample. A step computed from batch t also fits that
  batch's sampling noise, and ⟨−G_t, ΔW_t⟩ credits the fit as progress — above all for the reference step, whose
  same-batch credit lr·Σ|G_t| counts every coordinate's noise. So the step right after a check also takes the
  unconstrained gradient G_{t+1} — a fresh batch, at the weights the check's step produced — and scores both steps
  against it: ⟨−G_{t+1}, ΔW_t⟩ for the locked step and lr·⟨G_{t+1}, sign(G_t)⟩ for the reference (AdamW's fresh
  step, ε neglected). Between the two steps it keeps ΔW_t in coefficient coordinates (r-sized) and sign(G_t) as
  int8 (one byte per locked weight).

Calibrated on the SmolLM2 quality grid (7 runs of 5 locked methods, ``benchmarks/README.md``): the same-batch share
reads about a third of the measured share of full OPD's gain but orders runs well (Kendall's tau 0.90); the
next-batch share reads the measured share itself (mean absolute error 0.11) but orders runs less well (0.62), its
few checks being inner products of independent, noisy batch gradients.

Per-batch gradients are noisy, so even a well-locked run captures far less than all of a single batch's gradient
energy (SmolLM2 recipe: ~0.25, against 0.025 for a random subspace of the same size). The default threshold is
therefore relative: ``"auto"`` = :data:`AUTO_THRESHOLD_FACTOR` × the random baseline (r/in per matrix, r²/(in·out)
two-sided). Capture below the threshold for ``patience`` checks in a row is a *drift*; what then happens
(``warn`` / ``relock`` / ``unlock``) is the trainer's business.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from lockedopd.subspace.basis import SubspaceBasis

logger = logging.getLogger(__name__)
AUTO_THRESHOLD_FACTOR = 5.0


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a.double().flatten(), b.double().flatten()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else None


@dataclass
class TrajectoryMonitor:
    """Checks, on live batches, how much of unconstrained OPD's gradient the locked subspace captures.

    Args:
        every: check every this many locked steps.
        capture_threshold: captured-energy share under which a check counts as drifting, or ``"auto"``
            (:data:`AUTO_THRESHOLD_FACTOR` × the random-subspace baseline of the checked matrices).
        patience: consecutive drifting checks that make a drift.
        eps: the ε of the fresh-AdamW reference step.
    """

    every: int = 2
    capture_threshold: float | str = "auto"
    patience: int = 3
    eps: float = 1e-8
    history: list[dict] = field(default_factory=list)
    drift_events: list[int] = field(default_factory=list)
    _below: int = 0
    _pending: dict | None = None  # the last check's steps, to be scored on the next batch's gradient

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"TrajectoryMonitor: every must be >= 1, got {self.every}.")
        if self.capture_threshold != "auto" and (
            isinstance(self.capture_threshold, str) or not 0.0 <= self.capture_threshold <= 1.0
        ):
            raise ValueError(f"TrajectoryMonitor: capture_threshold must be in [0, 1], got {self.capture_threshold}.")
        if self.patience < 1:
            raise ValueError(f"TrajectoryMonitor: patience must be >= 1, got {self.patience}.")

    def threshold_for(self, random_baseline: float | None) -> float:
        """The capture threshold of a check whose matrices have this mean random baseline."""
        if self.capture_threshold == "auto":
            return min(1.0, AUTO_THRESHOLD_FACTOR * (random_baseline or 0.0))
        return float(self.capture_threshold)

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based, the step about to complete) is a check."""
        return step % self.every == 0

    def wants_gradient(self, step: int) -> bool:
        """Whether step ``step`` (1-based) needs the unconstrained gradient: a check, or the step right after one
        (its fresh batch scores the check's steps out of sample, :meth:`measure_next_batch`)."""
        return self.due(step) or (self._pending is not None and step == self._pending["step"] + 1)

    def measure(
        self,
        step: int,
        grads: dict[str, torch.Tensor],
        locked_steps: dict[str, torch.Tensor],
        bases: Mapping[str, SubspaceBasis | tuple[torch.Tensor | None, torch.Tensor]],
        reference_lr: float | None = None,
    ) -> dict:
        """Record one check.

        Args:
            step: the optimizer step (1-based).
            grads: module name → unconstrained gradient G of its weight (out × in).
            locked_steps: module name → the weight change the locked optimizer just made (out × in).
            bases: module name → its :class:`SubspaceBasis` (or a ``(U or None, V)`` pair).
            reference_lr: the step's base learning rate; with it the check also predicts, to first order, how much
                loss decrease the locked step buys against the unconstrained AdamW reference step
                −lr·G/(|G|+ε): ``predicted_decrease`` = ⟨−G, ΔW_locked⟩, ``reference_decrease`` =
                lr·Σ G²/(|G|+ε), and :meth:`summary` accumulates their ratio over checks
                (``predicted_progress_share``).
        Returns:
            the check's summary (also appended to ``history``): ``captured_energy`` (energy-weighted over
            matrices), ``captured_energy_min``, ``cosine_to_adam`` and ``cosine_to_gradient`` (means over
            matrices), ``drift`` (True when this check completes a drift).
        """
        inside = total = predicted = reference = 0.0
        per_matrix = {}
        deltas, signs = {}, {}  # what the next step scores this check's steps with (when reference_lr is given)
        for name, grad in grads.items():
            basis = SubspaceBasis.coerce(bases[name])
            e_in, e_all = basis.captured_energy(grad)
            inside, total = inside + e_in, total + e_all
            step_w = locked_steps[name]
            adam_step = -grad.double() / (grad.double().abs() + self.eps)
            predicted += float((-grad.double() * step_w.double()).sum())
            reference += float((-grad.double() * adam_step).sum())
            per_matrix[name] = {
                "random_baseline": basis.random_baseline(grad.shape[0]),
                "captured_energy": e_in / e_all if e_all > 0 else None,
                "cosine_to_adam": _cosine(step_w, adam_step),
                "cosine_to_gradient": _cosine(step_w, -grad),
            }
            if reference_lr is not None:
                # ΔW_locked lies in the subspace: its coefficients reduce(ΔW) hold it exactly (orthonormal bases)
                deltas[name] = basis.reduce(step_w.double())
                signs[name] = grad.sign().to(torch.int8)
        shares = [m["captured_energy"] for m in per_matrix.values() if m["captured_energy"] is not None]
        cos_adam = [m["cosine_to_adam"] for m in per_matrix.values() if m["cosine_to_adam"] is not None]
        cos_grad = [m["cosine_to_gradient"] for m in per_matrix.values() if m["cosine_to_gradient"] is not None]
        capture = inside / total if total > 0 else None
        baselines = [m["random_baseline"] for m in per_matrix.values()]
        baseline = sum(baselines) / len(baselines) if baselines else None
        threshold = self.threshold_for(baseline)
        drift = self._count_low_capture(step, capture, threshold)
        check = {
            "step": step,
            "captured_energy": capture,
            "random_baseline": baseline,
            "threshold": threshold,
            "captured_energy_min": min(shares) if shares else None,
            "cosine_to_adam": sum(cos_adam) / len(cos_adam) if cos_adam else None,
            "cosine_to_gradient": sum(cos_grad) / len(cos_grad) if cos_grad else None,
            "drift": drift,
            "matrices": per_matrix,
        }
        if reference_lr is not None and reference > 0:
            check["predicted_decrease"] = predicted
            check["reference_decrease"] = reference_lr * reference
            self._pending = {"step": step, "lr": float(reference_lr), "deltas": deltas, "signs": signs}
        self.history.append(check)
        return check

    def _count_low_capture(self, step: int, capture: float | None, threshold: float) -> bool:
        """Count this check towards a drift (``patience`` low captures in a row); True when it completes one."""
        self._below = self._below + 1 if capture is not None and capture < threshold else 0
        if self._below < self.patience:
            return False
        self.drift_events.append(step)
        self._below = 0
        logger.warning(
            "trajectory monitor: the locked subspace captured only %.3f of the gradient energy for %d checks in a row "
            "(threshold %.2f) at step %d",
            capture, self.patience, threshold, step,
        )  # fmt: skip
        return True

    def drop_pending(self) -> None:
        """Forget the check awaiting its next-batch score (the run leaves the subspace before the next step)."""
        self._pending = None

    def measure_next_batch(
        self,
        step: int,
        grads: dict[str, torch.Tensor],
        bases: Mapping[str, SubspaceBasis | tuple[torch.Tensor | None, torch.Tensor]],
    ) -> dict | None:
        """Score the previous check's steps on this step's fresh gradient (out of sample).

        Args:
            step: the optimizer step (1-based); it must follow the check directly, otherwise nothing is scored.
            grads: module name → the unconstrained gradient G_{t+1} of this step's batch.
            bases: module name → its basis (the check's).
        Returns:
            ``{"step": t, "next_batch_predicted_decrease": ⟨−G_{t+1}, ΔW_t⟩, "next_batch_reference_decrease":
            lr·⟨G_{t+1}, sign(G_t)⟩}`` (also stored on the check's ``history`` entry), or None when there is no
            check of step ``step - 1`` to score.
        """
        pending, self._pending = self._pending, None
        if pending is None or step != pending["step"] + 1:
            return None
        if set(grads) != set(pending["deltas"]):
            raise ValueError(
                f"TrajectoryMonitor.measure_next_batch: step {step} has gradients of {len(grads)} modules, the "
                f"step-{pending['step']} check measured {len(pending['deltas'])} others: pass the same modules."
            )
        predicted = reference = 0.0
        for name, grad in grads.items():
            g = grad.double()
            delta = pending["deltas"][name].to(device=g.device)
            predicted -= float((SubspaceBasis.coerce(bases[name]).reduce(g) * delta).sum())
            reference += float((g * pending["signs"][name].to(device=g.device, dtype=g.dtype)).sum())
        scored = {
            "next_batch_predicted_decrease": predicted,
            "next_batch_reference_decrease": pending["lr"] * reference,
        }
        for check in reversed(self.history):
            if check["step"] == pending["step"]:
                check.update(scored)
                break
        return {"step": pending["step"], **scored}

    def summary(self) -> dict:
        """Means over all checks, and whether any drift happened."""
        captures = [h["captured_energy"] for h in self.history if h["captured_energy"] is not None]
        cosines = [h["cosine_to_adam"] for h in self.history if h["cosine_to_adam"] is not None]
        return {
            "predicted_progress_share": self._share("predicted_decrease", "reference_decrease"),
            "next_batch_progress_share": self._share("next_batch_predicted_decrease", "next_batch_reference_decrease"),
            "next_batch_checks": sum(1 for h in self.history if "next_batch_predicted_decrease" in h),
            "checks": len(self.history),
            "captured_energy_mean": sum(captures) / len(captures) if captures else None,
            "captured_energy_min": min(captures) if captures else None,
            "random_baseline": self.history[-1]["random_baseline"] if self.history else None,
            "threshold": self.history[-1]["threshold"] if self.history else None,
            "cosine_to_adam_mean": sum(cosines) / len(cosines) if cosines else None,
            "drift_events": list(self.drift_events),
        }

    def _share(self, decrease: str, reference: str) -> float | None:
        """Σ decrease / Σ reference over the checks that have both (None without any, or a reference sum <= 0)."""
        scored = [h for h in self.history if decrease in h]
        total = sum(h[reference] for h in scored)
        return sum(h[decrease] for h in scored) / total if scored and total > 0 else None

    def state_dict(self) -> dict:
        """Plain-Python state for checkpoints (the per-matrix detail is kept); the tensors of a check awaiting its
        next-batch score are in :meth:`pending_tensors`."""
        pending = None if self._pending is None else {"step": self._pending["step"], "lr": self._pending["lr"]}
        return {"history": self.history, "drift_events": self.drift_events, "below": self._below, "pending": pending}

    def pending_tensors(self) -> dict[str, torch.Tensor]:
        """The awaiting check's ΔW coefficients and gradient signs, flat (``delta/<module>``, ``sign/<module>``)."""
        if self._pending is None:
            return {}
        out = {f"delta/{n}": t for n, t in self._pending["deltas"].items()}
        out.update({f"sign/{n}": t for n, t in self._pending["signs"].items()})
        return out

    def load_state_dict(self, state: dict, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Restore from :meth:`state_dict` (and :meth:`pending_tensors`, when a check awaits its next batch)."""
        self.history = list(state["history"])
        self.drift_events = list(state["drift_events"])
        self._below = int(state["below"])
        self._pending = None
        pending = state.get("pending")
        if pending is None:
            return
        tensors = tensors or {}
        deltas = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith("delta/")}
        signs = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith("sign/")}
        if not deltas or set(deltas) != set(signs):
            raise ValueError(
                f"TrajectoryMonitor: the checkpoint's step-{pending['step']} check awaits its next-batch score, but "
                "its tensors (delta/*, sign/*) are missing or do not match: the checkpoint is incomplete; resume "
                "from another checkpoint."
            )
        self._pending = {"step": int(pending["step"]), "lr": float(pending["lr"]), "deltas": deltas, "signs": signs}
