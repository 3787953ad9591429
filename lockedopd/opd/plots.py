"""Training-curve plot of a run (loss, sampled reverse KL, held-out reverse KL), written as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_training_curves(records: Sequence[dict[str, Any]], path: str | Path, lock_step: int | None = None) -> Path:
    """Three panels over steps: training loss, training reverse KL (sampled), held-out reverse KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_reverse_kl" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [
        (axes[0], train, "loss", "training loss"),
        (axes[1], train, "reverse_kl", "train reverse KL (sampled, nats/token)"),
        (axes[2], evals, "eval_reverse_kl", "held-out reverse KL (nats/token)"),
    ]
    for ax, rows, key, title in panels:
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if lock_step is not None:
            ax.axvline(lock_step, color="tab:red", linestyle="--", linewidth=1, label=f"lock @ {lock_step}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
