"""The library's own question of the paper experiment's locked runs: does the live trajectory monitor's estimate of
the share kept (read during the run, without the unconstrained run) tell the lock that loses its gain from the one
that keeps it? The measured shares are :func:`lockedopd.bench.paper_findings.sufficiency`'s."""

from __future__ import annotations

from typing import Any

from lockedopd.bench.accuracy_report import Cells
from lockedopd.bench.paper_arms import LOCKED, sufficiency
from lockedopd.bench.paper_findings import NOT_MEASURED

__all__ = ["MONITOR_ESTIMATE", "monitor_on_locks"]

#: The monitor's estimate that the locks are compared by: the same-batch share of unconstrained AdamW's first-order
#: progress (the one that ranks runs; the next-batch share is too noisy over a short locked phase, its reference sum
#: can even come out negative).
MONITOR_ESTIMATE = "predicted_progress_share"


def monitor_on_locks(cells: Cells) -> dict[str, Any]:
    """What the trajectory monitor said on each locked run, beside the share of the gain the run measurably kept.

    Returns:
        ``{"estimate": MONITOR_ESTIMATE, "per_seed": {arm: {seed: {"estimate", "measured", "captured_energy",
        "drift_events"}}}, "seeds": [...], "verdict", "verdict_by_arm": {arm: verdict}}``. A verdict compares an SFT
        arm's lock with OPD's on every seed that has both estimates and both measured shares: ``"agrees"`` when on
        each of them the monitor's estimate orders the two runs as their measured shares do (the lock that kept less
        reads lower), ``"opposite"`` when it orders them the other way on each, ``"mixed"`` otherwise,
        ``"not measured"`` without such a seed. ``verdict_by_arm`` holds one per SFT arm (``seeds`` are the SFT
        arm's); ``verdict`` pools every (SFT arm, seed) pair.
    """
    suff = sufficiency(cells)
    per_seed: dict[str, dict[int, dict[str, Any]]] = {}
    for arm, locked in LOCKED.items():
        per_seed[arm] = {}
        for seed, cell in sorted(cells.get(locked, {}).items()):
            monitor = (cell.get("summary") or {}).get("monitor") or {}
            per_seed[arm][seed] = {
                "estimate": monitor.get(MONITOR_ESTIMATE),
                "measured": suff[arm]["per_seed"].get(seed),
                "captured_energy": monitor.get("captured_energy_mean"),
                "drift_events": list(monitor.get("drift_events") or []),
            }
    by_arm = {arm: _ordering(per_seed, arm) for arm in per_seed if arm != "opd"}
    pairs = [sign for _, signs in by_arm.values() for sign in signs]
    return {
        "estimate": MONITOR_ESTIMATE,
        "per_seed": per_seed,
        "seeds": by_arm.get("sft", ([], []))[0],
        "verdict": _verdict(pairs),
        "verdict_by_arm": {arm: _verdict(signs) for arm, (_, signs) in by_arm.items()},
    }


def _ordering(per_seed: dict[str, dict[int, dict[str, Any]]], arm: str) -> tuple[list[int], list[float]]:
    """The seeds on which ``arm``'s lock and OPD's both have an estimate and a measured share, and on each the sign
    of (estimate difference) x (measured difference): positive when the monitor orders the two as measured."""
    seeds = [
        s
        for s in sorted(set(per_seed[arm]) & set(per_seed["opd"]))
        if all(per_seed[a][s][k] is not None for a in (arm, "opd") for k in ("estimate", "measured"))
    ]
    signs = [
        (per_seed[arm][s]["estimate"] - per_seed["opd"][s]["estimate"])
        * (per_seed[arm][s]["measured"] - per_seed["opd"][s]["measured"])
        for s in seeds
    ]
    return seeds, signs


def _verdict(signs: list[float]) -> str:
    """``agrees`` / ``opposite`` when every sign is positive / negative, ``mixed`` otherwise."""
    if not signs:
        return NOT_MEASURED
    if all(a > 0 for a in signs):
        return "agrees"
    if all(a < 0 for a in signs):
        return "opposite"
    return "mixed"
