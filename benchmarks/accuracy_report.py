"""Task accuracy of a quality grid: per-cell accuracy, the share of the best full-OPD reference's accuracy gain,
the reference's choice, and the tables and plot that lead the grid's report.

Used by ``benchmarks/quality.py`` when an experiment sets ``task`` (its cells then measure ``accuracy`` at the start,
the lock and the end). Definitions, per training seed s:

- accuracy: greedy exact match on the task's test problems at the end of the run (``eval_accuracy``); beside it the
  mean accuracy over k samples at temperature 1 (``eval_accuracy_sampled``);
- start of a method's gain: its accuracy at its lock step L (evaluated in its own run), or the seed's step-0
  accuracy (L = 0: methods that never lock or lock at step 0, e.g. LoRA, GaLore, full-parameter runs);
- share of the reference's gain: (acc_end(method) − acc_L) / (acc_end(reference) − acc_L), undefined where the
  reference ended where the method started;
- reference: among ``REFERENCE_CANDIDATES`` that ran, the one with the larger mean whole-run gain
  (acc_end − acc_0) over the seeds.
"""

from __future__ import annotations

from typing import Any

REFERENCE_CANDIDATES = ("full", "full_factored")
ACCURACY_KEYS = ("eval_accuracy", "eval_accuracy_sampled")


def cell_accuracy(records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """``{key: {step: value}}`` of a cell's accuracy evaluations (``ACCURACY_KEYS``) from its metrics records."""
    return {key: {r["step"]: r[key] for r in records if key in r} for key in ACCURACY_KEYS}


def start_accuracy(cells: dict[str, dict[int, dict[str, Any]]], seed: int, key: str) -> float | None:
    """The step-0 accuracy of a seed: from any cell of that seed that evaluated at step 0 (the step-0 student and
    its sampling seeds are the same for every method of a seed)."""
    for by_seed in cells.values():
        value = by_seed.get(seed, {}).get(key, {}).get(0)
        if value is not None:
            return value
    return None


def _final(cell: dict[str, Any], key: str) -> float | None:
    values = cell.get(key, {})
    return values[max(values)] if values else None


def gain_start(cells, method: str, seed: int, key: str) -> float | None:
    """acc_L of a method's cell: its own evaluation at its lock step, or the seed's step-0 accuracy (L = 0)."""
    cell = cells[method][seed]
    lock = cell.get("lock_step") or 0
    if lock:
        return cell.get(key, {}).get(lock)
    return start_accuracy(cells, seed, key)


def choose_reference(cells, t_interval) -> tuple[str | None, dict[str, Any]]:
    """The reference with the larger mean whole-run gain, and each candidate's gain interval."""
    gains: dict[str, Any] = {}
    for name in REFERENCE_CANDIDATES:
        per_seed = []
        for seed, cell in cells.get(name, {}).items():
            start, end = start_accuracy(cells, seed, "eval_accuracy"), _final(cell, "eval_accuracy")
            if start is not None and end is not None:
                per_seed.append(end - start)
        if per_seed:
            gains[name] = t_interval(per_seed)
    best = max(gains, key=lambda n: gains[n]["mean"]) if gains else None
    return best, gains


def aggregate_accuracy(cells, methods: list[str], t_interval) -> dict[str, Any]:
    """The accuracy section of ``results.json``: reference, student start, and per method its seeds, final accuracy,
    accuracy at its gain's start and its share of the reference's gain (greedy and sampled)."""
    reference, reference_gains = choose_reference(cells, t_interval)
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
        by_seed = cells.get(method, {})
        rows = [s for s in sorted(by_seed) if _final(by_seed[s], "eval_accuracy") is not None]
        if not rows:
            continue
        entry: dict[str, Any] = {"seeds": rows}
        for key, suffix in (("eval_accuracy", ""), ("eval_accuracy_sampled", "_sampled")):
            finals = {str(s): _final(by_seed[s], key) for s in rows}
            starts_m = {str(s): gain_start(cells, method, s, key) for s in rows}
            shares: dict[str, float] = {}
            for s in rows:
                ref_cell = cells.get(reference, {}).get(s) if reference else None
                start, end = starts_m[str(s)], finals[str(s)]
                ref_end = _final(ref_cell, key) if ref_cell else None
                if None not in (start, end, ref_end) and ref_end != start:
                    shares[str(s)] = (end - start) / (ref_end - start)
            entry[f"accuracy{suffix}"] = {**t_interval([v for v in finals.values() if v is not None]),
                                          "per_seed": finals}  # fmt: skip
            entry[f"gain_start{suffix}"] = starts_m
            entry[f"share_of_full_accuracy_gain{suffix}"] = {**t_interval(list(shares.values())), "per_seed": shares}
        out["methods"][method] = entry
    return out


ACCURACY_LR_RULE = (
    "highest mean final greedy accuracy on the split the screen evaluates (the validation split: a screen's "
    "accuracy.path), ties broken by mean@k; never the test split"
)


def select_by_accuracy(methods: dict[str, Any], screens: dict[str, list[str]]) -> dict[str, Any]:
    """Each screen's chosen method by :data:`ACCURACY_LR_RULE` from ``results.json``'s merged ``methods``."""
    out: dict[str, Any] = {}
    for family, members in screens.items():
        candidates = {
            name: None if "accuracy" not in methods.get(name, {}) else {
                "accuracy": methods[name]["accuracy"]["mean"],
                "accuracy_sampled": methods[name]["accuracy_sampled"]["mean"],
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


def _interval(entry: dict[str, Any] | None, scale: float, fmt: str, unit: str = "") -> str:
    """``mean [low, high]`` of an interval entry (``(n=1)`` without an interval; ``—`` without a mean)."""
    if not entry or entry.get("mean") is None:
        return "—"
    mean = format(scale * entry["mean"], fmt) + unit
    if entry.get("low") is None:
        return f"{mean} (n=1)"
    return f"{mean} [{format(scale * entry['low'], fmt)}, {format(scale * entry['high'], fmt)}]"


def _pct(entry: dict[str, Any] | None) -> str:
    return _interval(entry, 100.0, ".1f", "%")


def _ratio(entry: dict[str, Any] | None) -> str:
    return _interval(entry, 1.0, ".3f")


def accuracy_markdown(report: dict[str, Any]) -> list[str]:
    """The accuracy tables that open ``results.md`` (lines)."""
    acc = report["accuracy"]
    teacher = report.get("teacher") or {}
    lines = [
        f"Task `{report.get('task')}`: greedy exact match on {teacher.get('problems', '?')} problems (mean, 95% "
        "t-interval over training seeds); mean@k = mean accuracy of k samples per problem at temperature 1. Share = "
        f"share of the reference's accuracy gain; reference **{acc['reference']}** (the full-parameter run with the "
        "larger gain).",
        "",
        f"Teacher: greedy {_pct({'mean': teacher.get('greedy_accuracy')})}, mean@k "
        f"{_pct({'mean': teacher.get('sampled_accuracy')})}. "
        f"Student at step 0: greedy {_pct(acc['student_start_accuracy'])}, mean@k "
        f"{_pct(acc['student_start_accuracy_sampled'])}.",
        "",
        "| method | seeds | accuracy (greedy) | share of gain | mean@k | share of gain (mean@k) | optimizer state |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in acc["methods"].items():
        state = report["methods"].get(name, {}).get("optimizer_state_bytes")
        lines.append(
            f"| {name} | {len(m['seeds'])} | {_pct(m['accuracy'])} | {_ratio(m['share_of_full_accuracy_gain'])} | "
            f"{_pct(m['accuracy_sampled'])} | {_ratio(m['share_of_full_accuracy_gain_sampled'])} | "
            f"{'—' if state is None else f'{state / 2**20:.1f} MiB'} |"
        )
    lines += ["", "Per seed (greedy accuracy at the gain's start → end; share):", "",
              "| method | " + " | ".join(f"seed {s}" for s in _all_seeds(acc)) + " |",
              "|---|" + "---|" * len(_all_seeds(acc))]  # fmt: skip
    for name, m in acc["methods"].items():
        cells = []
        for s in _all_seeds(acc):
            end = m["accuracy"]["per_seed"].get(str(s))
            start = m["gain_start"].get(str(s))
            share = m["share_of_full_accuracy_gain"]["per_seed"].get(str(s))
            cells.append(
                "—" if end is None else f"{_p(start)} → {_p(end)}; {'—' if share is None else f'{share:.2f}'}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _p(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _all_seeds(acc: dict[str, Any]) -> list[int]:
    return sorted({s for m in acc["methods"].values() for s in m["seeds"]})


def plot_accuracy(report: dict[str, Any], path) -> Any:
    """``accuracy.png``: final greedy accuracy per method (bar = mean, dots = seeds) with the teacher's and the
    step-0 student's accuracy as lines, and each method's share of the reference's gain with its interval."""
    acc = report["accuracy"]
    methods = acc["methods"]
    if not methods:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lockedopd.runtime.plotting import distinct_colours, save_figure

    names = list(methods)
    colours = distinct_colours(names)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    for i, name in enumerate(names):
        m = methods[name]
        left.bar(i, 100 * m["accuracy"]["mean"], color=colours[name], alpha=0.8)
        left.scatter([i] * len(m["accuracy"]["per_seed"]), [100 * v for v in m["accuracy"]["per_seed"].values()],
                     color="black", s=10, zorder=3)  # fmt: skip
        share = m["share_of_full_accuracy_gain"]
        if share.get("mean") is not None:
            low, high = share.get("low"), share.get("high")
            err = None if low is None else [[share["mean"] - low], [high - share["mean"]]]
            right.bar(i, share["mean"], color=colours[name], alpha=0.8, yerr=err, capsize=3)
    teacher = report.get("teacher_accuracy")
    if teacher is not None:
        left.axhline(100 * teacher, color="tab:green", linestyle="--", linewidth=1, label="teacher")
    start = acc["student_start_accuracy"].get("mean")
    if start is not None:
        left.axhline(100 * start, color="tab:red", linestyle=":", linewidth=1, label="student at step 0")
    right.axhline(1.0, color="black", linewidth=0.8)
    for ax, title in ((left, "test accuracy at the end, greedy (%)"),
                      (right, f"share of {acc['reference']}'s accuracy gain (95% interval)")):  # fmt: skip
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    left.legend(fontsize=8)
    fig.suptitle(f"{report['experiment']}: task {report.get('task')}", fontsize=10)
    return save_figure(fig, path)
