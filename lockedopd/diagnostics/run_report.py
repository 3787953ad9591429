"""``trajectory.json`` and ``trajectory.png`` of a locked run: did it follow unconstrained OPD's path?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lockedopd.runtime.checkpoint import atomic_write_text, list_checkpoints
from lockedopd.runtime.plotting import save_figure

GAIN_SHARE_FOR_MATCH = 0.8


def _final_model(run_dir: Path) -> tuple[Path, Path] | None:
    found = list_checkpoints(run_dir)
    if len(found) < 2:
        return None
    return found[0][1] / "model.safetensors", found[-1][1] / "model.safetensors"


def compare_with_reference(run_dir: Path, summary: dict[str, Any], reference_dir: Path, top_k: int = 16) -> dict:
    """Final KL and final-update subspace similarity of a run against a reference (unconstrained) run."""
    from lockedopd.diagnostics.trajectory import final_update_similarity

    ref_summary_file = reference_dir / "summary.json"
    if not ref_summary_file.is_file():
        raise FileNotFoundError(f"reference run {reference_dir} has no summary.json; finish that run first.")
    ref = json.loads(ref_summary_file.read_text())
    out: dict[str, Any] = {"reference_run": str(reference_dir), "reference_final_reverse_kl": ref["final_reverse_kl"]}
    initial, final, ref_initial, ref_final = (
        summary.get("initial_reverse_kl"),
        summary.get("final_reverse_kl"),
        ref.get("initial_reverse_kl"),
        ref.get("final_reverse_kl"),
    )
    if None not in (final, ref_final) and ref_final > 0:
        out["kl_gap_ratio"] = final / ref_final
    if None not in (initial, final, ref_initial, ref_final) and ref_initial - ref_final > 0:
        out["kl_gain_share"] = (initial - final) / (ref_initial - ref_final)
    ours, theirs = _final_model(run_dir), _final_model(reference_dir)
    if ours and theirs:
        sims = final_update_similarity(ours[0], ours[1], theirs[0], theirs[1], top_k=top_k, progress=False)
        out["final_update_similarity"] = sims["mean"]
    return out


def write_trajectory_report(run_dir: Path, summary: dict[str, Any], monitor, config) -> dict[str, Any]:
    """Write ``trajectory.json`` (and ``trajectory.png`` when the monitor made checks); returns the report.

    Verdict: ``"matches"`` when the locked subspace kept at least the monitor's capture threshold of the gradient
    energy on average with no drift, and (with a reference run) the run reached at least
    :data:`GAIN_SHARE_FOR_MATCH` of the reference's KL reduction; otherwise ``"drifted"``.
    """
    run_dir = Path(run_dir)
    monitor_summary = monitor.summary() if monitor is not None else {}
    report: dict[str, Any] = {
        "lock_step": summary.get("lock_step"),
        "initial_reverse_kl": summary.get("initial_reverse_kl"),
        "final_reverse_kl": summary.get("final_reverse_kl"),
        "captured_energy_mean": monitor_summary.get("captured_energy_mean"),
        "captured_energy_min": monitor_summary.get("captured_energy_min"),
        "captured_energy_random_baseline": monitor_summary.get("random_baseline"),
        "cosine_to_adam_mean": monitor_summary.get("cosine_to_adam_mean"),
        "predicted_progress_share": monitor_summary.get("predicted_progress_share"),
        "next_batch_progress_share": monitor_summary.get("next_batch_progress_share"),
        "drift_events": monitor_summary.get("drift_events", []),
        "lock_events": summary.get("lock_events", []),
    }
    if config.reference_run:
        report.update(compare_with_reference(run_dir, summary, Path(config.reference_run), config.lock.rank))
    capture = report["captured_energy_mean"]
    threshold = monitor_summary.get("threshold")
    report["capture_threshold"] = threshold
    ok = capture is not None and threshold is not None and capture >= threshold and not report["drift_events"]
    if "kl_gain_share" in report:
        ok = ok and report["kl_gain_share"] >= GAIN_SHARE_FOR_MATCH
    report["verdict"] = "matches" if ok else "drifted"
    if monitor is not None:
        report["checks"] = [{k: v for k, v in h.items() if k != "matrices"} for h in monitor.history]
        if monitor.history:
            report["matrices_captured_energy"] = _per_matrix_mean(monitor.history)
            plot_monitor(report, run_dir / "trajectory.png")
    atomic_write_text(run_dir / "trajectory.json", json.dumps(report, indent=2))
    return report


def _per_matrix_mean(history: list[dict]) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for check in history:
        for name, values in check["matrices"].items():
            if values["captured_energy"] is not None:
                sums.setdefault(name, []).append(values["captured_energy"])
    return {name: sum(v) / len(v) for name, v in sums.items()}


def plot_monitor(report: dict[str, Any], path: Path) -> Path:
    """Captured gradient energy and step cosines per monitor check."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checks = report["checks"]
    steps = [c["step"] for c in checks]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(steps, [c["captured_energy"] for c in checks], marker="o", label="captured gradient energy")
    ax.plot(steps, [c["cosine_to_adam"] for c in checks], marker="s", label="cos(locked step, AdamW step)")
    ax.plot(steps, [c["cosine_to_gradient"] for c in checks], marker="^", label="cos(locked step, −G)")
    if report.get("captured_energy_random_baseline") is not None:
        ax.axhline(report["captured_energy_random_baseline"], color="grey", linestyle=":", label="random subspace")
    if report.get("capture_threshold") is not None:
        ax.axhline(report["capture_threshold"], color="tab:red", linestyle="--", linewidth=1, label="drift threshold")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("step")
    ax.set_title(f"locked run vs unconstrained OPD — verdict: {report['verdict']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
