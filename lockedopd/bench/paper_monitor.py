"""The library's own question of the paper experiment's locked runs: does the live trajectory monitor's estimate of
the share kept (read during the run, without the unconstrained run) tell the lock that loses its gain from the one
that keeps it? The measured shares are :func:`lockedopd.bench.paper_findings.sufficiency`'s."""

from __future__ import annotations

from typing import Any

from lockedopd.bench.accuracy_report import Cells
from lockedopd.bench.paper_arms import LOCKED, sufficiency

__all__ = ["MONITOR_ESTIMATE", "monitor_on_locks"]

#: The monitor's estimate that the locks are compared by: the same-batch share of unconstrained AdamW's first-order
#: progress (the one that ranks runs; the next-batch share is too noisy over a short locked phase, its reference sum
#: can even come out negative).
MONITOR_ESTIMATE = "predicted_progress_share"


def monitor_on_locks(cells: Cells) -> dict[str, Any]:
    """What the trajectory monitor said on each locked run, beside the share of the gain the run measurably kept.

    Returns:
        ``{"estimate": MONITOR_ESTIMATE, "per_seed": {arm: {seed: {"estimate", "measured", "captured_energy",
        "drift_events"}}}, "seeds": [...], "verdict"}``. The verdict compares the locked SFT and OPD runs of every seed
        that has both estimates and both measured shares: ``"agrees"`` when on each of them the monitor's estimate
        orders the two runs as their measured shares do (the lock that kept less reads lower), ``"opposite"`` when it
        orders them the other way on each, ``"mixed"`` otherwise, ``"not measured"`` without such a seed.
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
    seeds = [
        s
        for s in sorted(set(per_seed["sft"]) & set(per_seed["opd"]))
        if all(per_seed[a][s][k] is not None for a in ("sft", "opd") for k in ("estimate", "measured"))
    ]
    agree = [
        (per_seed["sft"][s]["estimate"] - per_seed["opd"][s]["estimate"])
        * (per_seed["sft"][s]["measured"] - per_seed["opd"][s]["measured"])
        for s in seeds
    ]
    if not seeds:
        verdict = "not measured"
    elif all(a > 0 for a in agree):
        verdict = "agrees"
    elif all(a < 0 for a in agree):
        verdict = "opposite"
    else:
        verdict = "mixed"
    return {"estimate": MONITOR_ESTIMATE, "per_seed": per_seed, "seeds": seeds, "verdict": verdict}
