"""The paper experiment's cells by role: the three training paradigms, each one's run locked to its early top-16
subspace, the controls on OPD, how reports name them, and the functional-sufficiency share of each lock.

Functional sufficiency of a lock on seed s: ``(acc_end(locked) − acc_L) / (acc_end(unconstrained) − acc_L)``, greedy,
with ``acc_L`` the locked run's own accuracy at its lock step L (where both runs stood: they are the same run up to L).
"""

from __future__ import annotations

from typing import Any

from lockedopd.bench.accuracy_report import Cells, final_accuracy
from lockedopd.bench.stats import t_interval

__all__ = ["ARMS", "CONTROLS", "LOCKED", "SFT_OFF_DISTRIBUTION", "label", "sufficiency"]

#: The three training paradigms, by cell name.
ARMS = ("sft", "opd", "rlvr")
#: SFT on text off the student's distribution (the same problems in another solution style): the paper's SFT trains
#: on another model's solutions, while ``sft`` trains on the very text its teacher was fine-tuned on. Its SFT claims
#: (the rank expands, the lock loses the gain) are checked on it too.
SFT_OFF_DISTRIBUTION = "sft_verbose"
#: Each paradigm's run locked to its own early top-16 subspace.
LOCKED = {"opd": "opd_locked", "sft": "sft_locked", SFT_OFF_DISTRIBUTION: "sft_verbose_locked"}
_LABELS = {SFT_OFF_DISTRIBUTION: "SFT (off-distribution)"}


def label(arm: str) -> str:
    """How reports name an arm: ``SFT``, ``OPD``, ``RLVR``, ``SFT (off-distribution)``."""
    return _LABELS.get(arm, arm.upper())


#: The controls on OPD (its ``opd`` cells are their baseline).
CONTROLS = {
    "token sparsification": ("keep_top_50", "keep_top_25", "keep_random_50", "keep_random_25"),
    "off-policy rollouts": ("offpolicy_teacher", "offpolicy_initial"),
    "objective mixing": ("mix_0.75", "mix_0.5", "mix_0.25", "mix_0"),
}


def sufficiency(cells: Cells) -> dict[str, Any]:
    """``{arm: {"seeds", "share": t_interval, "per_seed"}}`` for each arm of :data:`LOCKED`: each locked run's
    share of its unconstrained run's post-lock greedy accuracy gain (the locked run's own accuracy at its lock step
    is where both stood)."""
    out: dict[str, Any] = {}
    for arm, locked in LOCKED.items():
        shares: dict[int, float] = {}
        for seed, cell in sorted(cells.get(locked, {}).items()):
            lock, free = cell.get("lock_step"), cells.get(arm, {}).get(seed)
            start = cell.get("eval_accuracy", {}).get(lock) if lock else None
            end, free_end = final_accuracy(cell, "eval_accuracy"), free and final_accuracy(free, "eval_accuracy")
            if None not in (start, end, free_end) and free_end != start:
                shares[seed] = (end - start) / (free_end - start)
        out[arm] = {"seeds": sorted(shares), "share": t_interval(list(shares.values())), "per_seed": shares}
    return out
