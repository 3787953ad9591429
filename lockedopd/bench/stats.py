"""The statistics every benchmark report shares: a mean with its 95% Student-t interval, the spread of a few
values, Kendall's tau, and the share of full OPD's post-lock gain in held-out reverse KL.

Share of full OPD's post-lock gain of a method on seed s:
``(KL_full,s(L) - KL_end(method, s)) / (KL_full,s(L) - KL_end(full, s))`` with ``L`` the method's lock step and
``KL_full,s(L)`` the same seed's full run's held-out KL at step L (full runs must evaluate at L: pick ``eval_steps``
dividing the lock step).
"""

from __future__ import annotations

import math
from typing import Any

# two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (a statistical table, not a result)
T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_interval(values: list[float]) -> dict[str, Any]:
    """Mean and 95% Student-t interval of ``values`` (``low``/``high`` are None with fewer than two values)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "std": None, "n": 0}
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "std": None, "n": n}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    half = t * std / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "std": std, "n": n}


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value), min and max of a non-empty list."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def kendall_tau(pairs: dict[Any, tuple[float, float]]) -> float:
    """Kendall's tau-a of the (estimate, measured) pairs: (concordant − discordant) / all pairs."""
    keys = sorted(pairs, key=str)
    concordant = discordant = 0
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            sign = (pairs[a][0] - pairs[b][0]) * (pairs[a][1] - pairs[b][1])
            concordant += sign > 0
            discordant += sign < 0
    return (concordant - discordant) / (len(keys) * (len(keys) - 1) / 2)


def full_kl_at(full_cell: dict[str, Any], step: int) -> tuple[float, bool]:
    """The full run's held-out KL at ``step`` and whether it had to be interpolated.

    Exact when the run evaluated at ``step``; otherwise linear between the evaluations either side of it (flagged,
    so a report can say so). Raises ``ValueError`` when ``step`` lies outside the evaluated range.
    """
    kl = full_cell["eval_reverse_kl"]
    if step in kl:
        return kl[step], False
    before = [s for s in kl if s < step]
    after = [s for s in kl if s > step]
    if not before or not after:
        raise ValueError(
            f"the full run of seed {full_cell['seed']} has no held-out evaluation around step {step} (it evaluated "
            f"at {sorted(kl)}); set eval_steps so that it divides the lock step."
        )
    lo, hi = max(before), min(after)
    return kl[lo] + (kl[hi] - kl[lo]) * (step - lo) / (hi - lo), True


def share_of_full_gain(method_cell: dict[str, Any], full_cell: dict[str, Any]) -> float | None:
    """(KL_full(L) - KL_end(method)) / (KL_full(L) - KL_end(full)), L = the method's lock step; None if undefined.

    Both cells are of the same training seed; KL_full(L) comes from :func:`full_kl_at`. A method that never locks
    (GaLore, or any whole-run optimizer) is measured over the whole run, L = 0. None when full OPD made no progress
    after L.
    """
    lock_step = method_cell.get("lock_step") or 0
    start, _ = full_kl_at(full_cell, lock_step)
    end_full = full_cell["eval_reverse_kl"][full_cell["final_step"]]
    end_method = method_cell["eval_reverse_kl"][method_cell["final_step"]]
    if start == end_full:
        return None
    return (start - end_method) / (start - end_full)
