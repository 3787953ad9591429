"""Per-seed access to the paper experiment's geometry: each cell's checkpoint series and end-of-run metrics, as
:mod:`lockedopd.bench.geometry` wrote them, and the comparisons of two trajectories the findings use."""

from __future__ import annotations

from typing import Any

from lockedopd.bench.accuracy_report import Cells

__all__ = ["final_by_seed", "geometry_by_seed", "largest_gap", "last_mean", "mean_series", "series_by_seed"]


def geometry_by_seed(cells: Cells, method: str) -> dict[int, dict[str, Any]]:
    """Per seed, the ``geometry`` of each of ``method``'s cells that measured one."""
    return {s: c["geometry"] for s, c in cells.get(method, {}).items() if c.get("geometry")}


def final_by_seed(cells: Cells, method: str, key: str) -> dict[int, float]:
    """Per seed, ``key`` of the end-of-run (Table-1) metrics, where measured."""
    return {s: g["final"][key] for s, g in geometry_by_seed(cells, method).items() if g["final"].get(key) is not None}


def series_by_seed(cells: Cells, method: str, key: str = "stable_rank_median") -> dict[int, list[float]]:
    """Per seed, ``key`` at every checkpoint (seeds with an unmeasured checkpoint, e.g. an update still zero, are
    left out)."""
    series = {s: [r[key] for r in g["per_step"]] for s, g in geometry_by_seed(cells, method).items()}
    return {s: values for s, values in series.items() if values and all(v is not None for v in values)}


def last_mean(cells: Cells, method: str, key: str) -> float:
    """``key`` at the last checkpoint, mean over the seeds that measured every checkpoint (nan without one)."""
    last = [series[-1] for series in series_by_seed(cells, method, key).values()]
    return sum(last) / len(last) if last else float("nan")


def largest_gap(ours: list[float], base: list[float]) -> float | None:
    """The largest relative gap ``|a - b| / |b|`` between two trajectories, checkpoint by checkpoint: what the
    ``keeps`` rule bounds (None when they cannot be compared)."""
    if not ours or not base or len(ours) != len(base):
        return None
    return max(abs(a - b) / abs(b) if b else (0.0 if a == b else float("inf")) for a, b in zip(ours, base))


def mean_series(by_seed: dict[int, list[float]]) -> list[float]:
    """The checkpoint-by-checkpoint mean of equally long per-seed series (empty when they differ in length)."""
    rows = [r for r in by_seed.values() if r and all(v is not None for v in r)]
    if not rows or len({len(r) for r in rows}) != 1:
        return []
    return [sum(col) / len(col) for col in zip(*rows)]
