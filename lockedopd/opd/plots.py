"""Training-curve plot of a run (loss, sampled reverse KL, held-out reverse KL), written as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lockedopd.runtime.plotting import save_figure


def plot_training_curves(records: Sequence[dict[str, Any]], path: str | Path, lock_step: int | None = None) -> Path:
    """Panels over steps: training loss, training reverse KL (sampled; the NLL for supervised runs), held-out
    reverse KL (or NLL) and, when measured, held-out task accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    supervised = any("nll" in r for r in train)
    wanted = [
        ("loss", "training loss"),
        ("nll" if supervised else "reverse_kl", "train NLL (nats/token)" if supervised
         else "train reverse KL (sampled, nats/token)"),
        ("eval_nll" if supervised else "eval_reverse_kl", "held-out NLL of the given completions" if supervised
         else "held-out reverse KL (nats/token)"),
        ("eval_accuracy", "held-out task accuracy (greedy)"),
    ]  # fmt: skip
    shown = [(key, title) for key, title in wanted if any(key in r for r in records)]
    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(4.4 * max(len(shown), 1), 3.6), squeeze=False)
    panels = [(ax, [r for r in records if key in r], key, title) for ax, (key, title) in zip(axes[0], shown)]
    for ax, rows, key, title in panels:
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if lock_step is not None:
            ax.axvline(lock_step, color="tab:red", linestyle="--", linewidth=1, label=f"lock @ {lock_step}")
            ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_run_comparison(run_dirs: Sequence[str | Path], labels: Sequence[str], path: str | Path) -> Path:
    """Held-out reverse KL of several runs over steps, in one panel, with each run's lock step marked."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(run_dirs) != len(labels):
        raise ValueError(f"plot_run_comparison: {len(run_dirs)} run directories but {len(labels)} labels.")
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for run_dir, label in zip(run_dirs, labels):
        metrics = Path(run_dir) / "metrics.jsonl"
        if not metrics.is_file():
            raise FileNotFoundError(f"{metrics} does not exist; is {run_dir} a lockedopd run directory?")
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        evals = [r for r in records if "eval_reverse_kl" in r]
        (line,) = ax.plot([r["step"] for r in evals], [r["eval_reverse_kl"] for r in evals], marker="o", label=label)
        lock = next((r["step"] for r in records if r.get("locked_now")), None)
        if lock is not None:
            ax.axvline(lock, color=line.get_color(), linestyle="--", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out reverse KL (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
