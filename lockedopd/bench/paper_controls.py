"""The controls on OPD against OPD itself: how far each variant's stable-rank trajectory strays from OPD's, beside
OPD's own seed-to-seed spread, with its update's size and what it learned (``results.json`` ``controls``)."""

from __future__ import annotations

from typing import Any

from lockedopd.bench.accuracy_report import Cells, final_accuracy
from lockedopd.bench.paper_arms import CONTROLS
from lockedopd.bench.paper_trajectories import largest_gap, last_mean, mean_series, series_by_seed

__all__ = ["controls_summary"]


def controls_summary(cells: Cells, baseline: str = "opd") -> list[dict[str, Any]]:
    """One row per control variant that ran, after the baseline's own: what each family's verdict reads, with its
    margin.

    Each row has ``family``, ``variant``, ``seeds``, ``largest_gap`` (the largest relative gap between the variant's
    mean median-stable-rank trajectory and the baseline's, checkpoint by checkpoint: ``keeps`` means at most
    :data:`lockedopd.bench.paper_findings.KEEP_TOLERANCE`), and means over its seeds of ``stable_rank_end`` and
    ``update_norm_end`` (median stable rank and ‖ΔW‖_F at the last checkpoint) and ``greedy_accuracy_end`` (None
    where no seed evaluated it). The baseline's row gives its seed-to-seed spread instead: the largest gap of one of
    its seeds from their mean, the floor below which no variant can be told from it.
    """
    base_series = series_by_seed(cells, baseline)
    base = mean_series(base_series)
    if not base:
        return []
    spread = [g for g in (largest_gap(r, base) for r in base_series.values()) if g is not None]
    rows = [_control_row(cells, "baseline", baseline, max(spread) if spread else None)]
    for family, variants in CONTROLS.items():
        for variant in variants:
            series = series_by_seed(cells, variant)
            if series:
                rows.append(_control_row(cells, family, variant, largest_gap(mean_series(series), base)))
    return rows


def _control_row(cells: Cells, family: str, method: str, gap: float | None) -> dict[str, Any]:
    accuracy = [
        a for a in (final_accuracy(c, "eval_accuracy") for c in cells.get(method, {}).values()) if a is not None
    ]
    return {
        "family": family,
        "variant": method,
        "seeds": sorted(series_by_seed(cells, method)),
        "largest_gap": gap,
        "stable_rank_end": last_mean(cells, method, "stable_rank_median"),
        "update_norm_end": last_mean(cells, method, "update_fro_norm"),
        "greedy_accuracy_end": sum(accuracy) / len(accuracy) if accuracy else None,
    }
