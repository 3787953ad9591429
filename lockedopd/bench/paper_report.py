"""The paper experiment's report: ``findings.md`` (one row a finding: the paper's number, ours, the verdict), the
findings and the sufficiency shares in ``results.json``, and figures in the shape of the paper's Figs. 4-7:
``trajectories.png`` (stable rank, ‖ΔW‖_F and Hill α̂ over training per arm), ``early_subspace.png`` (similarity of
each checkpoint's top-16 subspace to the final update's), ``sufficiency.png`` (share of the gain kept under the
lock, OPD vs SFT) and ``controls.png`` (stable rank of each control against OPD's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lockedopd.bench.accuracy_report import Cells
from lockedopd.bench.paper_arms import ARMS, CONTROLS, SFT_OFF_DISTRIBUTION, label, sufficiency
from lockedopd.bench.paper_controls import controls_summary
from lockedopd.bench.paper_findings import KEEP_TOLERANCE, NOT_MEASURED, RULES, findings
from lockedopd.bench.paper_monitor import monitor_on_locks
from lockedopd.bench.tables import markdown_table

__all__ = ["paper_section", "own_starts", "findings_markdown", "plot_paper"]


def paper_section(cells: Cells) -> dict[str, Any]:
    """The ``findings``, ``findings_not_measured``, ``sufficiency``, ``controls``
    (:func:`~lockedopd.bench.paper_controls.controls_summary`), ``monitor``
    (:func:`~lockedopd.bench.paper_monitor.monitor_on_locks`) and per-method mean ``trajectories`` keys of
    ``results.json``.

    ``findings`` holds the claims with a verdict (``reproduced``, ``not reproduced`` or ``opposite``);
    ``findings_not_measured`` the ones whose cells have not run yet, in the same shape with the verdict
    ``not measured``, so that a reader of ``findings`` never mistakes a missing measurement for a result."""
    trajectories = {}
    for method, by_seed in cells.items():
        runs = [c["geometry"] for c in by_seed.values() if c.get("geometry")]
        if runs:
            trajectories[method] = {
                "steps": [r["step"] for r in runs[0]["per_step"]],
                **{key: _mean_rows([[r[key] for r in g["per_step"]] for g in runs]) for key in TRAJECTORY_KEYS},
                "seeds": sorted(s for s, c in by_seed.items() if c.get("geometry")),
            }
    every = findings(cells)
    return {
        "findings": [f for f in every if f["verdict"] != NOT_MEASURED],
        "findings_not_measured": [f for f in every if f["verdict"] == NOT_MEASURED],
        "sufficiency": sufficiency(cells),
        "controls": controls_summary(cells),
        "monitor": monitor_on_locks(cells),
        "trajectories": trajectories,
        "own_starts": own_starts(cells),
    }


def own_starts(cells: Cells) -> dict[str, list[str]]:
    """``{method: its student.* overrides}`` of the methods that start from another student than the others (e.g.
    RLVR from an SFT anchor): their ΔW and accuracy gain are measured from that student."""
    starts = {}
    for method, by_seed in cells.items():
        for cell in by_seed.values():
            if cell.get("own_student"):
                starts[method] = [o for o in cell.get("overrides", []) if o.startswith("student.")]
                break
    return starts


TRAJECTORY_KEYS = ("stable_rank_median", "update_fro_norm", "hill_alpha_median", "subspace_similarity_mean")


def _mean_rows(rows: list[list[float | None]]) -> list[float | None]:
    width = min(len(r) for r in rows)
    out = []
    for col in zip(*(r[:width] for r in rows)):
        values = [v for v in col if v is not None]
        out.append(sum(values) / len(values) if values else None)
    return out


def findings_markdown(report: dict[str, Any]) -> str:
    """``findings.md``: the verdict table, the rules behind the verdicts and the sufficiency shares."""
    every = report["findings"] + report.get("findings_not_measured", [])
    rows = [[f["id"], f["claim"], f["paper"], f["measured"], f["verdict"]] for f in every]
    counts = {v: sum(f["verdict"] == v for f in every) for v in
              ("reproduced", "not reproduced", "opposite", NOT_MEASURED)}  # fmt: skip
    lines = [
        f"# The paper's findings on `{report.get('task')}` ({report.get('experiment')})",
        "",
        "*On the Geometry of On-Policy Distillation* (arXiv 2606.07082), measured here on one student: "
        + ", ".join(f"{n} {v}" for v, n in counts.items() if n)
        + ". Figures: `trajectories.png` (Fig. 4), `early_subspace.png` (Fig. 5), `sufficiency.png` (Fig. 6), "
        "`controls.png` (Fig. 7).",
        "",
        *markdown_table(["id", "claim", "paper", "measured (mean [95% interval] over seeds)", "verdict"], rows),
        "",
        *[
            f"{method.upper()} starts from its own student ({', '.join(f'`{o}`' for o in overrides)}): its ΔW and its "
            "accuracy gain are measured from that student, the other arms' from the seed's shared one.\n"
            for method, overrides in report.get("own_starts", {}).items()
        ],
        "Verdict rules:",
        "",
        *[f"- {name}: {rule}" for name, rule in RULES.items()],
        "",
    ]
    if report.get("controls"):
        lines += [*_controls_markdown(report["controls"]), ""]
    suff = report["sufficiency"]
    lines += [
        "Functional sufficiency (share of the unconstrained run's post-lock greedy accuracy gain, per seed):",
        "",
    ]
    for arm, entry in suff.items():
        per = ", ".join(f"seed {s}: {v:.3f}" for s, v in sorted(entry["per_seed"].items())) or "no finished pair yet"
        lines.append(f"- {label(arm)}: {per}")
    if report.get("monitor"):
        lines += ["", *_monitor_markdown(report["monitor"])]
    return "\n".join(lines) + "\n"


CONTROLS_HEADER = ["run", "family", "seeds", "largest gap to OPD", "median stable rank at the end",
                   "‖ΔW‖_F at the end", "greedy accuracy at the end"]  # fmt: skip


def _controls_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The controls against OPD: how far each variant's stable-rank trajectory strays from OPD's, beside OPD's own
    seed-to-seed spread, with its update's size and what it learned."""

    def _number(x: float | None, fmt: str = ".3g") -> str:
        return "—" if x is None else format(x, fmt)

    table = [
        [r["variant"] if r["family"] != "baseline" else f"{r['variant']} (seed to seed)",
         r["family"], ", ".join(map(str, r["seeds"])), _number(r["largest_gap"], ".1%"),
         _number(r["stable_rank_end"]), _number(r["update_norm_end"]), _number(r["greedy_accuracy_end"], ".3f")]
        for r in rows
    ]  # fmt: skip
    return [
        f"The controls against OPD: the largest gap between a variant's mean median-stable-rank trajectory and "
        f"OPD's, checkpoint by checkpoint (`keeps` means at most {KEEP_TOLERANCE:.0%}); OPD's own row is the largest "
        "gap of one of its seeds from their mean, the spread below which no variant can be told from it.",
        "",
        *markdown_table(CONTROLS_HEADER, table),
    ]


def _monitor_markdown(monitor: dict[str, Any]) -> list[str]:
    """The live monitor on the two locks: its estimate beside the share each run measurably kept."""

    def _number(x: float | None) -> str:
        return "—" if x is None else f"{x:.3f}"

    rows = [
        [label(arm), str(seed), _number(e["estimate"]), _number(e["measured"]), _number(e["captured_energy"]),
         ", ".join(map(str, e["drift_events"])) or "none"]
        for arm, by_seed in monitor["per_seed"].items()
        for seed, e in sorted(by_seed.items())
    ]  # fmt: skip
    return [
        f"The live monitor on these locks (`{monitor['estimate']}`, read during the run without the unconstrained "
        f"one): does it tell the lock that kept less of its gain? Verdict over every SFT lock against OPD's on its "
        f"seed: **{monitor['verdict']}** ("
        + ", ".join(f"{label(arm)}: {v}" for arm, v in monitor.get("verdict_by_arm", {}).items())
        + "; agrees: on every seed its estimate orders the SFT and OPD locks as their measured shares do).",
        "",
        *markdown_table(["lock", "seed", "monitor's estimate", "measured share", "captured energy", "drift at"], rows),
    ]


def plot_paper(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """The four figures (those with data); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lockedopd.runtime.plotting import save_figure

    traj = report["trajectories"]
    written = []
    arms = [a for a in (*ARMS, SFT_OFF_DISTRIBUTION) if a in traj]
    if arms:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, key, title in zip(axes, TRAJECTORY_KEYS[:3], ("stable rank (median)", "‖ΔW‖_F", "Hill α̂ (median)")):
            for arm in arms:
                ax.plot(traj[arm]["steps"], traj[arm][key], marker="o", label=label(arm))
            ax.set_title(title)
            ax.set_xlabel("step")
        axes[0].legend()
        written.append(save_figure(fig, out_dir / "trajectories.png"))
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for arm in arms:
            ax.plot(traj[arm]["steps"], traj[arm]["subspace_similarity_mean"], marker="o", label=label(arm))
        ax.set(title="top-16 similarity to the final update", xlabel="step", ylim=(0, 1.05))
        ax.legend()
        written.append(save_figure(fig, out_dir / "early_subspace.png"))
    suff = report["sufficiency"]
    if any(entry["share"]["mean"] is not None for entry in suff.values()):
        fig, ax = plt.subplots(figsize=(4, 3.6))
        names = [a for a in suff if suff[a]["share"]["mean"] is not None]
        shares = [suff[a]["share"] for a in names]
        means = [t["mean"] for t in shares]
        below = [t["mean"] - (t["low"] if t["low"] is not None else t["mean"]) for t in shares]
        above = [(t["high"] if t["high"] is not None else t["mean"]) - t["mean"] for t in shares]
        colours = ["tab:blue", "tab:orange", "tab:green"][: len(names)]
        ax.bar([label(a) for a in names], means, yerr=[below, above], capsize=6, color=colours)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set(title="gain kept under the early lock", ylabel="share of the unconstrained gain")
        written.append(save_figure(fig, out_dir / "sufficiency.png"))
    families = [(f, [v for v in variants if v in traj]) for f, variants in CONTROLS.items()]
    families = [(f, v) for f, v in families if v]
    spread = next((r["largest_gap"] for r in report.get("controls", []) if r["family"] == "baseline"), None)
    if families and "opd" in traj:
        fig, axes = plt.subplots(1, len(families), figsize=(4.4 * len(families), 3.6), squeeze=False)
        for ax, (family, variants) in zip(axes[0], families):
            steps, opd_rank = traj["opd"]["steps"], traj["opd"]["stable_rank_median"]
            ax.plot(steps, opd_rank, color="black", lw=2, label="OPD")
            known = [(s, r) for s, r in zip(steps, opd_rank) if r is not None]
            ax.fill_between([s for s, _ in known], [(1 - KEEP_TOLERANCE) * r for _, r in known],
                            [(1 + KEEP_TOLERANCE) * r for _, r in known], color="grey", alpha=0.15,
                            label=f"keeps OPD's (±{KEEP_TOLERANCE:.0%})")  # fmt: skip
            if spread is not None:
                ax.fill_between([s for s, _ in known], [(1 - spread) * r for _, r in known],
                                [(1 + spread) * r for _, r in known], color="black", alpha=0.15,
                                label=f"OPD's seed spread (±{spread:.1%})")  # fmt: skip
            for v in variants:
                ax.plot(traj[v]["steps"], traj[v]["stable_rank_median"], marker=".", label=v)
            ax.set(title=family, xlabel="step", ylabel="stable rank (median)")
            ax.legend(fontsize=7)
        written.append(save_figure(fig, out_dir / "controls.png"))
    return written
