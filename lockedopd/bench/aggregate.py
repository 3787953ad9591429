"""From finished cells to ``results.json``'s per-method figures: held-out KL per eval step over seeds, final KL,
the share of full OPD's post-lock gain per seed and as a mean with its 95% t-interval, memory, time, the monitor."""

from __future__ import annotations

from typing import Any

from lockedopd.bench.experiment import REFERENCE
from lockedopd.bench.monitor import monitor_figures
from lockedopd.bench.stats import full_kl_at, share_of_full_gain, spread, t_interval

Cells = dict[str, dict[int, dict[str, Any]]]  # method -> seed -> the cell's facts (lockedopd.bench.cells.parse_cell)
CURVES = ("eval_reverse_kl", "eval_fixed_text_kl", "eval_fixed_text_forward_kl")
ALL_SEEDS_KEYS = ("seeds", "final_reverse_kl", "final_fixed_text_kl", "share_of_full_gain", "lock_step",
                  "per_seed_wall_s", "monitor")  # fmt: skip


def _shares(method: str, by_seed: dict[int, dict[str, Any]], full: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The ``share_of_full_gain`` entry of one method: per seed against the same seed's full run, and its interval."""
    shares: dict[str, float] = {}
    missing: list[int] = []
    interpolated: list[int] = []
    for s in sorted(by_seed):
        if method == REFERENCE:
            shares[str(s)] = 1.0
        elif by_seed[s]["final_step"] not in by_seed[s]["eval_reverse_kl"]:
            continue  # no KL to the teacher (sft, rlvr): no KL share
        elif s in full:
            value = share_of_full_gain(by_seed[s], full[s])
            if value is not None:
                shares[str(s)] = value
                if full_kl_at(full[s], by_seed[s]["lock_step"] or 0)[1]:
                    interpolated.append(s)
        else:
            missing.append(s)
    entry = {**t_interval(list(shares.values())), "per_seed": shares}
    if missing:
        entry["seeds_without_full_run"] = missing
    if interpolated:
        entry["seeds_with_interpolated_kl_lock"] = interpolated
    return entry


def aggregate_method(method: str, by_seed: dict[int, dict[str, Any]], full: dict[int, dict[str, Any]]) -> dict:
    """One method's entry of ``results.json``'s ``methods`` from its finished cells ``{seed: facts}``."""
    seeds = sorted(by_seed)
    entry: dict[str, Any] = {"seeds": seeds}
    for key in CURVES:
        per_cell = [c.get(key, {}) for c in by_seed.values()]
        steps = sorted({step for values in per_cell for step in values})
        entry[key] = {str(step): spread([v[step] for v in per_cell if step in v]) for step in steps}
    finals = [by_seed[s]["eval_reverse_kl"].get(by_seed[s]["final_step"]) for s in seeds]
    if all(v is not None for v in finals):  # a run without a teacher (sft, rlvr) has no KL to it
        entry["final_reverse_kl"] = {**t_interval(finals), "per_seed": dict(zip(map(str, seeds), finals))}
    fixed = [by_seed[s].get("eval_fixed_text_kl", {}).get(by_seed[s]["final_step"]) for s in seeds]
    if all(v is not None for v in fixed):
        entry["final_fixed_text_kl"] = {**t_interval(fixed), "per_seed": dict(zip(map(str, seeds), fixed))}
    entry["share_of_full_gain"] = _shares(method, by_seed, full)
    entry["lock_step"] = {str(s): by_seed[s].get("lock_step") for s in seeds}
    entry["lock_reason"] = {str(s): by_seed[s].get("lock_reason") for s in seeds}
    last = by_seed[seeds[-1]]
    entry["trainable_params"] = last["trainable_params"]
    entry["optimizer_state_bytes"] = last["optimizer_state_bytes"]
    entry["wall_s"] = spread([by_seed[s]["wall_s"] for s in seeds])
    entry["mean_step_time_s"] = spread([by_seed[s]["mean_step_time_s"] for s in seeds])
    entry["per_seed_wall_s"] = {str(s): by_seed[s]["wall_s"] for s in seeds}
    monitor = monitor_figures([by_seed[s].get("summary", {}).get("monitor") for s in seeds], seeds)
    if monitor:
        entry["monitor"] = monitor
    return entry


def aggregate(cells: Cells, methods: list[str]) -> dict[str, Any]:
    """``results.json``'s ``methods`` section from finished cells ``{method: {seed: facts}}``."""
    full = cells.get(REFERENCE, {})
    return {method: aggregate_method(method, cells[method], full) for method in methods if cells.get(method)}


def every_seed_view(methods: dict[str, Any], all_seeds: dict[str, Any] | None) -> dict[str, Any]:
    """Each method's entry over every seed it ran: its ``all_seeds`` entry where it ran extra seeds, else its
    common-seed entry."""
    return {name: (all_seeds or {}).get(name, entry) for name, entry in methods.items()}


def aggregate_on_common_seeds(
    cells: Cells, methods: list[str], common_seeds: list[int]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(methods, all_seeds)``: every method aggregated over the grid's common seeds only, so that methods are
    compared on the same seeds; and, for the methods that also ran extra seeds, their figures over all their seeds
    (:data:`ALL_SEEDS_KEYS`; each share against the same seed's full run)."""
    common = {m: {s: c for s, c in by_seed.items() if s in common_seeds} for m, by_seed in cells.items()}
    aggregated = aggregate(common, methods)
    wider = [m for m in methods if any(s not in common_seeds for s in cells.get(m, {}))]
    everything = aggregate(cells, wider) if wider else {}
    all_seeds = {m: {k: entry[k] for k in ALL_SEEDS_KEYS if k in entry} for m, entry in everything.items()}
    return aggregated, all_seeds
