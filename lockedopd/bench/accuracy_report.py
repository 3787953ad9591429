"""Task accuracy of a quality grid: per-cell accuracy, the share of the best full-OPD reference's accuracy gain,
the reference's choice, and the tables that lead the grid's report.

Used when an experiment sets ``task`` (its cells then measure ``accuracy`` at the start, the lock and the end).
Definitions, per training seed s:

- accuracy: greedy exact match on the task's test problems at the end of the run (``eval_accuracy``); beside it the
  mean accuracy over k samples at temperature 1 (``eval_accuracy_sampled``);
- start of a method's gain: its accuracy at its lock step L (evaluated in its own run), or the seed's step-0
  accuracy (L = 0: methods that never lock or lock at step 0, e.g. LoRA, GaLore, full-parameter runs), or, for a
  method that starts from another student (``own_student``: e.g. an RL arm from an SFT anchor), its own step-0
  accuracy;
- share of the reference's gain: (acc_end(method) − acc_L) / (acc_end(reference) − acc_L), undefined where the
  reference ended where the method started;
- reference: among ``REFERENCE_CANDIDATES`` that ran, the one with the larger mean whole-run gain
  (acc_end − acc_0) over the seeds.
"""

from __future__ import annotations

from typing import Any

from lockedopd.bench.stats import t_interval
from lockedopd.bench.tables import interval, markdown_table, mib, percent

REFERENCE_CANDIDATES = ("full", "full_factored")
ACCURACY_KEYS = ("eval_accuracy", "eval_accuracy_sampled")
ACCURACY_LR_RULE = (
    "highest mean final greedy accuracy on the split the screen evaluates (the validation split: a screen's "
    "accuracy.path), ties broken by mean@k; never the test split"
)
Cells = dict[str, dict[int, dict[str, Any]]]  # method -> seed -> the cell's facts


def cell_accuracy(records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """``{key: {step: value}}`` of a cell's accuracy evaluations (``ACCURACY_KEYS``) from its metrics records."""
    return {key: {r["step"]: r[key] for r in records if key in r} for key in ACCURACY_KEYS}


def start_accuracy(cells: Cells, seed: int, key: str) -> float | None:
    """The step-0 accuracy of a seed: from any cell of that seed that evaluated at step 0 (the step-0 student and
    its sampling seeds are the same for every method of a seed that does not start from its own student)."""
    for by_seed in cells.values():
        if by_seed.get(seed, {}).get("own_student"):
            continue
        value = by_seed.get(seed, {}).get(key, {}).get(0)
        if value is not None:
            return value
    return None


def final_accuracy(cell: dict[str, Any], key: str) -> float | None:
    """A cell's last evaluation of ``key`` (None without one)."""
    values = cell.get(key, {})
    return values[max(values)] if values else None


def gain_start(cells: Cells, method: str, seed: int, key: str) -> float | None:
    """acc_L of a method's cell: its own evaluation at its lock step (or at step 0 when it started from its own
    student), else the seed's step-0 accuracy (L = 0)."""
    cell = cells[method][seed]
    lock = cell.get("lock_step") or 0
    if lock or cell.get("own_student"):
        return cell.get(key, {}).get(lock)
    return start_accuracy(cells, seed, key)


def choose_reference(cells: Cells) -> tuple[str | None, dict[str, Any]]:
    """The reference with the larger mean whole-run gain, and each candidate's gain interval (over all its seeds).

    The candidates are compared on the seeds they all have (a seed's gain differs from the next seed's more than
    the candidates differ), and on all their seeds only when they share none."""
    per_seed: dict[str, dict[int, float]] = {}
    for name in REFERENCE_CANDIDATES:
        for seed, cell in cells.get(name, {}).items():
            start, end = start_accuracy(cells, seed, "eval_accuracy"), final_accuracy(cell, "eval_accuracy")
            if start is not None and end is not None:
                per_seed.setdefault(name, {})[seed] = end - start
    gains = {name: t_interval(list(by_seed.values())) for name, by_seed in per_seed.items()}
    common = set.intersection(*(set(by_seed) for by_seed in per_seed.values())) if per_seed else set()

    def mean_gain(name: str) -> float:
        """``name``'s mean gain over the common seeds (all of its own when there are none)."""
        seeds = common or per_seed[name]
        return sum(per_seed[name][s] for s in seeds) / len(seeds)

    best = max(per_seed, key=mean_gain) if per_seed else None
    return best, gains


def _method_accuracy(cells: Cells, method: str, reference: str | None) -> dict[str, Any] | None:
    """One method's accuracy entry: final accuracy, its gain's start and its share of the reference's gain."""
    by_seed = cells.get(method, {})
    rows = [s for s in sorted(by_seed) if final_accuracy(by_seed[s], "eval_accuracy") is not None]
    if not rows:
        return None
    entry: dict[str, Any] = {"seeds": rows}
    for key, suffix in (("eval_accuracy", ""), ("eval_accuracy_sampled", "_sampled")):
        finals = {str(s): final_accuracy(by_seed[s], key) for s in rows}
        starts = {str(s): gain_start(cells, method, s, key) for s in rows}
        shares: dict[str, float] = {}
        for s in rows:
            ref_cell = cells.get(reference, {}).get(s) if reference else None
            start, end = starts[str(s)], finals[str(s)]
            ref_end = final_accuracy(ref_cell, key) if ref_cell else None
            if None not in (start, end, ref_end) and ref_end != start:
                shares[str(s)] = (end - start) / (ref_end - start)
        entry[f"accuracy{suffix}"] = {**t_interval([v for v in finals.values() if v is not None]), "per_seed": finals}
        entry[f"gain_start{suffix}"] = starts
        entry[f"share_of_full_accuracy_gain{suffix}"] = {**t_interval(list(shares.values())), "per_seed": shares}
    return entry


def aggregate_accuracy(cells: Cells, methods: list[str]) -> dict[str, Any]:
    """The accuracy section of ``results.json``: reference, student start, and per method its seeds, final accuracy,
    accuracy at its gain's start and its share of the reference's gain (greedy and sampled)."""
    reference, reference_gains = choose_reference(cells)
    seeds = sorted({s for by_seed in cells.values() for s in by_seed})
    starts = {key: [v for s in seeds if (v := start_accuracy(cells, s, key)) is not None] for key in ACCURACY_KEYS}
    out: dict[str, Any] = {
        "reference": reference,
        "reference_gains": reference_gains,
        "student_start_accuracy": t_interval(starts["eval_accuracy"]),
        "student_start_accuracy_sampled": t_interval(starts["eval_accuracy_sampled"]),
        "methods": {},
    }
    for method in methods:
        entry = _method_accuracy(cells, method, reference)
        if entry is not None:
            out["methods"][method] = entry
    return out


def select_by_accuracy(methods: dict[str, Any], screens: dict[str, list[str]]) -> dict[str, Any]:
    """Each screen's chosen method by :data:`ACCURACY_LR_RULE` from ``results.json``'s merged ``methods``."""
    out: dict[str, Any] = {}
    for family, members in screens.items():
        candidates = {
            name: None if "accuracy" not in methods.get(name, {}) else {
                "accuracy": methods[name]["accuracy"]["mean"],
                "accuracy_sampled": (methods[name].get("accuracy_sampled") or {}).get("mean"),  # none: greedy only
            }
            for name in members
        }  # fmt: skip
        scored = {n: (c["accuracy"], c["accuracy_sampled"] or 0.0) for n, c in candidates.items() if c}
        out[family] = {
            "candidates": candidates,
            "selected": max(scored, key=scored.__getitem__) if scored else None,
            "complete": len(scored) == len(members),
        }
    return out


def _pct(entry: dict[str, Any] | None) -> str:
    return interval(entry, 1, 100.0, "%")


def accuracy_markdown(report: dict[str, Any]) -> list[str]:
    """The accuracy tables that open ``results.md`` (lines)."""
    acc = report["accuracy"]
    teacher = report.get("teacher") or {}
    lines = [
        f"Task `{report.get('task')}`: greedy exact match on {teacher.get('problems', '?')} problems (mean, 95% "
        "t-interval over training seeds); mean@k = mean accuracy of k samples per problem at temperature 1. Share = "
        f"share of the reference's accuracy gain; reference **{acc['reference']}** (the full-parameter run with the "
        "larger mean gain on the seeds both have).",
        "",
        f"Teacher: greedy {_pct({'mean': teacher.get('greedy_accuracy')})}, mean@k "
        f"{_pct({'mean': teacher.get('sampled_accuracy')})}. "
        f"Student at step 0: greedy {_pct(acc['student_start_accuracy'])}, mean@k "
        f"{_pct(acc['student_start_accuracy_sampled'])}.",
        "",
    ]
    head = ["method", "seeds", "accuracy (greedy)", "share of gain", "mean@k", "share of gain (mean@k)",
            "optimizer state"]  # fmt: skip
    rows = []
    for name, m in acc["methods"].items():
        state = report["methods"].get(name, {}).get("optimizer_state_bytes")
        rows.append([name, len(m["seeds"]), _pct(m["accuracy"]), interval(m["share_of_full_accuracy_gain"]),
                     _pct(m["accuracy_sampled"]), interval(m["share_of_full_accuracy_gain_sampled"]),
                     "—" if state is None else mib(state)])  # fmt: skip
    lines += markdown_table(head, rows)
    seeds = sorted({s for m in acc["methods"].values() for s in m["seeds"]})
    lines += ["", "Per seed (greedy accuracy at the gain's start → end; share):", ""]
    rows = []
    for name, m in acc["methods"].items():
        cells = []
        for s in seeds:
            end = m["accuracy"]["per_seed"].get(str(s))
            start = m["gain_start"].get(str(s))
            share = m["share_of_full_accuracy_gain"]["per_seed"].get(str(s))
            cells.append("—" if end is None else f"{percent(start)} → {percent(end)}; " + (
                "—" if share is None else f"{share:.2f}"))  # fmt: skip
        rows.append([name, *cells])
    lines += markdown_table(["method", *(f"seed {s}" for s in seeds)], rows)
    return lines + [""]
