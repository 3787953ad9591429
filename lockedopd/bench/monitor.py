"""What the trajectory monitor said about each method of a grid, and whether its estimates rank the methods (and
the runs) as their measured shares of full OPD's gain do."""

from __future__ import annotations

from typing import Any

from lockedopd.bench.stats import kendall_tau

MONITOR_FIGURES = (
    "captured_energy_mean",
    "random_baseline",
    "predicted_progress_share",
    "next_batch_progress_share",
    "cosine_to_adam_mean",
)
# the monitor's estimates of the share of unconstrained progress kept, each ranked against the measured shares
MONITOR_ESTIMATES = ("predicted_progress_share", "next_batch_progress_share")


def monitor_figures(summaries: list[dict[str, Any] | None], seeds: list[int] | None = None) -> dict[str, Any] | None:
    """The trajectory monitor's figures of a method, averaged over the seeds that have them, and whether it flagged
    the method: captured gradient energy at or below the threshold (5x a random subspace's) or a drift event.

    With ``seeds`` (one per summary) it also says which seeds each estimate of :data:`MONITOR_ESTIMATES` came from
    (``estimate_seeds``), so the estimate is ranked against the measured shares of those seeds only.
    """
    seeds = list(range(len(summaries))) if seeds is None else seeds
    present = [(s, m) for s, m in zip(seeds, summaries) if m and m.get("checks")]
    if not present:
        return None
    out: dict[str, Any] = {"seeds": len(present), "estimate_seeds": {}}
    for key in MONITOR_FIGURES:
        values = [m[key] for _, m in present if m.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
        if key in MONITOR_ESTIMATES:
            out["estimate_seeds"][key] = [s for s, m in present if m.get(key) is not None]
            out.setdefault("per_seed", {})[key] = {str(s): m[key] for s, m in present if m.get(key) is not None}
    present = [m for _, m in present]
    out["flagged"] = any(
        m.get("drift_events")
        or (m.get("captured_energy_mean") is not None and m.get("threshold") is not None
            and m["captured_energy_mean"] <= m["threshold"])
        for m in present
    )  # fmt: skip
    return out


def measured_share(method: dict[str, Any], seeds: list[int] | None) -> float | None:
    """The method's mean measured share over ``seeds`` (all its seeds when None or when per-seed shares are absent)."""
    share = method["share_of_full_gain"]
    per_seed = share.get("per_seed")
    if seeds is None or per_seed is None:
        return share.get("mean")
    values = [per_seed[str(s)] for s in seeds if str(s) in per_seed]
    return sum(values) / len(values) if values else None


def ranking_agreement(methods: dict[str, Any], estimate: str = "predicted_progress_share") -> dict[str, Any] | None:
    """Does one of the monitor's estimates (:data:`MONITOR_ESTIMATES`) rank the methods as their measured shares
    do? Kendall's tau over the methods that have both (1 = same order), with both orders. Each method's measured
    share is the mean over the seeds its estimate came from."""
    pairs = {}
    for name, m in methods.items():
        monitor = m.get("monitor", {})
        if monitor.get(estimate) is None:
            continue
        measured = measured_share(m, monitor.get("estimate_seeds", {}).get(estimate))
        if measured is not None:
            pairs[name] = (monitor[estimate], measured)
    if len(pairs) < 2:
        return None
    names = sorted(pairs)
    return {
        "estimate": estimate,
        "kendall_tau": kendall_tau(pairs),
        "by_predicted_share": sorted(names, key=lambda n: -pairs[n][0]),
        "by_measured_share": sorted(names, key=lambda n: -pairs[n][1]),
    }


def cell_ranking_agreement(methods: dict[str, Any], cells_of: str = "next_batch_progress_share") -> dict[str, Any]:
    """Run by run: on the cells (method, seed) that have the ``cells_of`` estimate, Kendall's tau between each
    estimate of :data:`MONITOR_ESTIMATES` and the cell's measured share — both estimates on the same runs, so
    they can be compared (a method's mean share mixes seeds whose full runs gained more or less)."""
    cells = {}
    for name, m in methods.items():
        per_seed = m.get("monitor", {}).get("per_seed", {})
        shares = m["share_of_full_gain"].get("per_seed", {})
        for seed in per_seed.get(cells_of, {}):
            if seed in shares and all(seed in per_seed.get(e, {}) for e in MONITOR_ESTIMATES):
                cells[f"{name}/seed{seed}"] = {e: per_seed[e][seed] for e in MONITOR_ESTIMATES} | {
                    "measured": shares[seed]
                }
    out: dict[str, Any] = {"cells": cells}
    if len(cells) >= 2:
        for estimate in MONITOR_ESTIMATES:
            out[estimate] = kendall_tau({c: (v[estimate], v["measured"]) for c, v in cells.items()})
    return out
