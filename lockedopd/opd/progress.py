"""The training loop's progress bar (tqdm): the step, the phase and the step's loss and KL (or NLL)."""

from __future__ import annotations

from typing import Any

__all__ = ["StepProgress"]


class StepProgress:
    """A tqdm bar over optimizer steps, or nothing when ``enabled`` is false (non-main processes, ``progress: false``).

    Args:
        enabled: whether to show a bar.
        total: the run's ``max_steps``.
        initial: the step the run starts (or resumes) from.
    """

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="OPD", unit="step", dynamic_ncols=True)

    def update(self, record: dict[str, Any], phase: str) -> None:
        """Advance by the step that ``record`` (a metrics.jsonl record) describes."""
        if self.bar is None:
            return
        self.bar.update(1)
        shown = {"kl": record["reverse_kl"]} if "reverse_kl" in record else {"nll": record["nll"]}
        self.bar.set_postfix(phase=phase, **{k: f"{v:.3f}" for k, v in shown.items()}, loss=f"{record['loss']:.3f}")

    def close(self) -> None:
        """Close the bar (idempotent)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
