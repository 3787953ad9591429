"""The quality grid's figures: ``quality.png`` (KL vs step per method over seeds) and, on a task grid,
``accuracy.png`` (final accuracy and the share of the reference's gain per method)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_quality(report: dict[str, Any], path: Path) -> Path | None:
    """``quality.png``: held-out reverse KL (and fixed-text KL) vs step, mean with a min..max band per method."""
    methods = report["methods"]
    if not methods:
        return None
    plt = _pyplot()
    from lockedopd.runtime.plotting import distinct_colours, save_figure

    keys = [("eval_reverse_kl", "held-out reverse KL, on-policy (nats/token)")]
    if any(m.get("eval_fixed_text_kl") for m in methods.values()):
        keys.append(("eval_fixed_text_kl", "reverse KL on the teacher's greedy text (nats/token)"))
    if any(m.get("eval_fixed_text_forward_kl") for m in methods.values()):
        keys.append(("eval_fixed_text_forward_kl", "forward KL on the teacher's greedy text (coverage)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), squeeze=False)
    colours = distinct_colours(methods)
    for ax, (key, title) in zip(axes[0], keys):
        for name, m in methods.items():
            points = sorted((int(s), e) for s, e in m.get(key, {}).items())
            if not points:
                continue
            steps = [s for s, _ in points]
            ax.plot(steps, [e["mean"] for _, e in points], marker="o", markersize=3, color=colours[name],
                    label=f"{name} (n={len(m['seeds'])})")  # fmt: skip
            ax.fill_between(steps, [e["min"] for _, e in points], [e["max"] for _, e in points],
                            color=colours[name], alpha=0.15, linewidth=0)  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a grid without a teacher KL (sft, rlvr screens) draws nothing here
            ax.legend(fontsize=8)
    fig.suptitle(f"{report['experiment']}: mean over training seeds, band = min..max", fontsize=10)
    return save_figure(fig, path)


def plot_accuracy(report: dict[str, Any], path: Path) -> Path | None:
    """``accuracy.png``: final greedy accuracy per method (bar = mean, dots = seeds) with the teacher's and the
    step-0 student's accuracy as lines, and each method's share of the reference's gain with its interval."""
    acc = report["accuracy"]
    methods = acc["methods"]
    if not methods:
        return None
    plt = _pyplot()
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
