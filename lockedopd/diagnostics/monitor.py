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
  accumulated over the checks — an estimate of the share of unconstrained progress the locked phase keeps (to be
  calibrated against the measured shares of ``benchmarks/quality.py``).

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
        shares = [m["captured_energy"] for m in per_matrix.values() if m["captured_energy"] is not None]
        cos_adam = [m["cosine_to_adam"] for m in per_matrix.values() if m["cosine_to_adam"] is not None]
        cos_grad = [m["cosine_to_gradient"] for m in per_matrix.values() if m["cosine_to_gradient"] is not None]
        capture = inside / total if total > 0 else None
        baselines = [m["random_baseline"] for m in per_matrix.values()]
        baseline = sum(baselines) / len(baselines) if baselines else None
        threshold = self.threshold_for(baseline)
        self._below = self._below + 1 if capture is not None and capture < threshold else 0
        drift = self._below >= self.patience
        if drift:
            self.drift_events.append(step)
            self._below = 0
            logger.warning(
                "trajectory monitor: the locked subspace captured only %.3f of the gradient energy for %d checks "
                "in a row (threshold %.2f) at step %d",
                capture,
                self.patience,
                threshold,
                step,
            )
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
        self.history.append(check)
        return check

    def summary(self) -> dict:
        """Means over all checks, and whether any drift happened."""
        captures = [h["captured_energy"] for h in self.history if h["captured_energy"] is not None]
        cosines = [h["cosine_to_adam"] for h in self.history if h["cosine_to_adam"] is not None]
        predicted = [h for h in self.history if "predicted_decrease" in h]
        reference = sum(h["reference_decrease"] for h in predicted)
        return {
            "predicted_progress_share": (
                sum(h["predicted_decrease"] for h in predicted) / reference if predicted and reference > 0 else None
            ),
            "checks": len(self.history),
            "captured_energy_mean": sum(captures) / len(captures) if captures else None,
            "captured_energy_min": min(captures) if captures else None,
            "random_baseline": self.history[-1]["random_baseline"] if self.history else None,
            "threshold": self.history[-1]["threshold"] if self.history else None,
            "cosine_to_adam_mean": sum(cosines) / len(cosines) if cosines else None,
            "drift_events": list(self.drift_events),
        }

    def state_dict(self) -> dict:
        """Plain-Python state for checkpoints (the per-matrix detail is kept)."""
        return {"history": self.history, "drift_events": self.drift_events, "below": self._below}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`."""
        self.history = list(state["history"])
        self.drift_events = list(state["drift_events"])
        self._below = int(state["below"])
