"""``results.md`` of a quality grid, and the compact table a README shows between quality-table markers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lockedopd.bench.accuracy_report import ACCURACY_LR_RULE, accuracy_markdown
from lockedopd.bench.aggregate import every_seed_view
from lockedopd.bench.monitor import measured_share
from lockedopd.bench.tables import fmt, interval, markdown_table, mean_std, mib
from lockedopd.bench.targets import targets_markdown

FIXED_TEXT_TABLES = (
    ("eval_fixed_text_kl", "Reverse KL(student ‖ teacher) on the teacher's fixed greedy text"),
    ("eval_fixed_text_forward_kl", "Forward KL(teacher ‖ student) on the teacher's fixed greedy text (coverage)"),
)
README_BEGIN = "<!-- quality-table: generated from "
README_END = "<!-- /quality-table -->"
README_STEPS = [0, 4, 8, 12, 16, 20, 24, 28, 30]


def _summary(report: dict[str, Any]) -> list[str]:
    """One row per method: final KLs, share of full gain, parameters, memory, time; the methods that did not run."""
    head = ["method", "seeds", "final held-out KL", "final fixed-text KL", "share of full gain", "trainable params",
            "optimizer state", "wall s / cell"]  # fmt: skip
    rows = [
        [name, len(m["seeds"]), interval(m.get("final_reverse_kl")), interval(m.get("final_fixed_text_kl", {})),
         interval(m["share_of_full_gain"]), f"{m['trainable_params']:,}", mib(m["optimizer_state_bytes"]),
         f"{m['wall_s']['mean']:.0f}"]
        for name, m in report["methods"].items()
    ]  # fmt: skip
    rows += [[name, "not run"] for name in report["not_run"]]
    return ["", *markdown_table(head, rows)]


def _extra_seeds(report: dict[str, Any]) -> list[str]:
    wider = report.get("all_seeds") or {}
    if not wider:
        return []
    lines = [
        "",
        "## With their extra seeds",
        "",
        f"The table above compares every method on the common seeds {report['seeds']}; these methods also "
        "ran extra seeds (`extra_seeds`), each share against the same seed's full run:",
        "",
    ]
    head = ["method", "seeds", "final held-out KL", "final fixed-text KL", "share of full gain"]
    rows = [[name, ", ".join(map(str, m["seeds"])), interval(m.get("final_reverse_kl")),
             interval(m.get("final_fixed_text_kl", {})), interval(m["share_of_full_gain"])]
            for name, m in wider.items()]  # fmt: skip
    return lines + markdown_table(head, rows)


def _per_step(methods: dict[str, Any]) -> list[str]:
    """Held-out KL per eval step (mean ± std), then the fixed-text KLs per eval step (mean)."""
    lines: list[str] = []
    steps = sorted({int(s) for m in methods.values() for s in m["eval_reverse_kl"]})
    if steps:
        lines += ["", "## Held-out reverse KL per eval step (mean ± std over seeds)", ""]
        rows = [[name, *(mean_std(m["eval_reverse_kl"].get(str(s))) for s in steps)] for name, m in methods.items()]
        lines += markdown_table(["method", *map(str, steps)], rows)
    for key, title in FIXED_TEXT_TABLES:
        fixed_steps = sorted({int(s) for m in methods.values() for s in m.get(key, {})})
        if not fixed_steps:
            continue
        lines += ["", f"## {title} per eval step (mean over seeds)", ""]
        rows = []
        for name, m in methods.items():
            values = [m.get(key, {}).get(str(s)) for s in fixed_steps]
            rows.append([name, *("" if e is None else f"{e['mean']:.3f}" for e in values)])
        lines += markdown_table(["method", *map(str, fixed_steps)], rows)
    return lines


def _monitor_table(every_seed: dict[str, Any]) -> list[str]:
    head = ["method", "captured gradient energy", "random subspace", "cosine to full AdamW step",
            "same-batch estimate", "measured share", "next-batch estimate (its seeds)", "measured share, those seeds",
            "flagged"]  # fmt: skip
    rows = []
    for name, m in every_seed.items():
        mon = m.get("monitor")
        if not mon:
            continue
        next_seeds = mon.get("estimate_seeds", {}).get("next_batch_progress_share") or []
        next_batch = mon.get("next_batch_progress_share")
        shown = "" if next_batch is None else f"{next_batch:.3f} ({', '.join(map(str, next_seeds))})"
        on_those = measured_share(m, next_seeds) if next_seeds else None
        rows.append([name, fmt(mon["captured_energy_mean"], 3), fmt(mon["random_baseline"], 3),
                     fmt(mon["cosine_to_adam_mean"], 3), fmt(mon["predicted_progress_share"], 3),
                     interval(m["share_of_full_gain"]), shown, fmt(on_those, 3),
                     "yes" if mon["flagged"] else "no"])  # fmt: skip
    return markdown_table(head, rows)


def _monitor(report: dict[str, Any], every_seed: dict[str, Any]) -> list[str]:
    """What the trajectory monitor said against the measured shares, and how well its estimates rank them."""
    if not any(m.get("monitor") for m in every_seed.values()):
        return []
    title = "## What the trajectory monitor said (mean over every seed a method ran) against the measured share"
    lines = ["", title, "", *_monitor_table(every_seed)]
    for key, what in (("monitor_ranking", "same-batch"), ("monitor_ranking_next_batch", "next-batch")):
        ranking = report.get(key)
        if ranking:
            lines += ["", f"Kendall's tau between the {what} estimate and the measured shares (of the seeds the "
                      f"estimate has): {ranking['kendall_tau']:.2f} (estimated order "
                      f"{', '.join(ranking['by_predicted_share'])}; measured "
                      f"{', '.join(ranking['by_measured_share'])})."]  # fmt: skip
    by_run = report.get("monitor_ranking_by_run") or {}
    if by_run.get("cells"):
        lines += ["", "Run by run, on the runs that have the next-batch estimate:", ""]
        rows = [[cell, f"{v['predicted_progress_share']:.3f}", f"{v['next_batch_progress_share']:.3f}",
                 f"{v['measured']:.3f}"]
                for cell, v in sorted(by_run["cells"].items(), key=lambda kv: -kv[1]["measured"])]  # fmt: skip
        lines += markdown_table(["run", "same-batch estimate", "next-batch estimate", "measured share"], rows)
        if "next_batch_progress_share" in by_run:
            lines += [
                "",
                f"Kendall's tau over these {len(by_run['cells'])} runs: same-batch "
                f"{by_run['predicted_progress_share']:.2f}, next-batch {by_run['next_batch_progress_share']:.2f}.",
            ]
    return lines


def _lr_selection(report: dict[str, Any]) -> list[str]:
    selection = report.get("lr_selection")
    if not selection:
        return []
    lines = ["", "## Learning-rate selection", "", f"Rule: {selection['rule']}.", ""]
    by_accuracy = selection["rule"] == ACCURACY_LR_RULE
    columns = ("accuracy", "accuracy_sampled") if by_accuracy else ("final_reverse_kl", "final_fixed_text_kl")
    heads = ["final accuracy (greedy)", "final mean@k"]
    if not by_accuracy:
        heads = ["final held-out KL", "final fixed-text KL"]
    rows: list[list[str]] = []
    for family, screen in selection["families"].items():
        for name, c in screen["candidates"].items():
            mark = "**yes**" if name == screen["selected"] else ""
            rows.append([family, name, "not run"] if c is None else [family, name, fmt(c[columns[0]], 3),
                                                                      fmt(c[columns[1]], 3), mark])  # fmt: skip
        if not screen["complete"]:
            rows.append([family, "(incomplete: the choice may change)"])
    return lines + markdown_table(["family", "candidate", *heads, "selected"], rows)


def _per_seed(report: dict[str, Any], every_seed: dict[str, Any]) -> list[str]:
    head = ["method", "seed", "lock step", "final held-out KL", "share of full gain", "wall s"]
    rows = [
        [name, s, fmt(m["lock_step"][str(s)]), fmt(m.get("final_reverse_kl", {}).get("per_seed", {}).get(str(s))),
         fmt(m["share_of_full_gain"]["per_seed"].get(str(s)), 3), fmt(m["per_seed_wall_s"][str(s)], 0)]
        for name, m in every_seed.items()
        for s in m["seeds"]
    ]  # fmt: skip
    lines = ["", "## Per seed", "", *markdown_table(head, rows)]
    if report["not_run"]:
        lines += ["", "## Not run", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in report["not_run"].items()]
    if report["pending_cells"]:
        lines += ["", f"Pending cells: {', '.join(report['pending_cells'])}."]
    return lines + differing_builds_section(report.get("built_models", {}))


def differing_builds_section(builds: dict[str, dict[str, list[str]]]) -> list[str]:
    """A section naming the built models whose cells trained on more than one build (other weights: the same
    recipe trained in another environment), with the cells on each."""
    differing = {source: by_digest for source, by_digest in builds.items() if len(by_digest) > 1}
    if not differing:
        return []
    lines = ["", "## Cells on different builds of one model", ""]
    for source, by_digest in differing.items():
        builds_text = "; ".join(f"weights {digest}: {', '.join(cells)}" for digest, cells in by_digest.items())
        lines.append(f"- `{source}`: {builds_text}")
    return lines


def markdown_report(report: dict[str, Any]) -> str:
    """``results.md``: a summary table per method, held-out KL per eval step, per-seed shares, what did not run."""
    methods = report["methods"]
    lines = [f"# Quality benchmark: {report['experiment']}", ""]
    if report.get("accuracy"):
        lines += ["## Task accuracy", "", *accuracy_markdown(report), *targets_markdown(report.get("targets", []))]
        lines += ["## Held-out reverse KL", ""]
    lines.append(
        f"Base config `{report['base_config']}`, seeds {report['seeds']}; common overrides "
        f"`{report['overrides']}`. Share = share of full OPD's post-lock gain in held-out reverse KL (mean, 95% "
        "t-interval over seeds); KL in nats/token."
    )
    every_seed = every_seed_view(methods, report.get("all_seeds") or {})
    lines += _summary(report) + _extra_seeds(report) + _per_step(methods) + _monitor(report, every_seed)
    lines += _lr_selection(report) + _per_seed(report, every_seed)
    return "\n".join(lines) + "\n"


def readme_table(report: dict[str, Any], steps: list[int] | None = None) -> str:
    """A compact markdown table for a README: held-out KL at chosen eval steps, shares per seed, memory, time."""
    methods = report["methods"]
    all_steps = sorted({int(s) for m in methods.values() for s in m["eval_reverse_kl"]})
    steps = [s for s in (steps or all_steps) if s in all_steps]
    head = ["method", "seeds", *(f"KL @{s}" for s in steps), "fixed-text KL @0 → end", "share of full gain per seed",
            "share mean [95% CI]", "optimizer state", "wall min / cell"]  # fmt: skip
    rows = []
    for name, m in methods.items():
        fixed = m.get("eval_fixed_text_kl", {})
        fixed_steps = sorted(int(s) for s in fixed)
        fixed_text = (
            f"{fixed[str(fixed_steps[0])]['mean']:.2f} → {fixed[str(fixed_steps[-1])]['mean']:.2f}"
            if fixed_steps
            else ""
        )
        shares = m["share_of_full_gain"]["per_seed"]
        kl = [mean_std(m["eval_reverse_kl"].get(str(s))) for s in steps]
        per_seed = ", ".join(f"{v:.3f}" for v in shares.values())
        seeds = ",".join(map(str, m["seeds"]))
        rows.append([name, seeds, *kl, fixed_text, per_seed, interval(m["share_of_full_gain"]),
                     mib(m["optimizer_state_bytes"]), f"{m['wall_s']['mean'] / 60:.0f}"])  # fmt: skip
    rows += [[name, "not run"] for name in report["not_run"]]
    lines = markdown_table(head, rows)
    if report["pending_cells"]:
        lines += ["", f"Not run yet (pending): {', '.join(report['pending_cells'])}."]
    return "\n".join(lines)


def update_readme(report: dict[str, Any], readme: Path, results_path: str) -> None:
    """Replace the block between the quality-table markers of ``readme`` with :func:`readme_table`."""
    text = readme.read_text()
    begin = text.find(README_BEGIN)
    end = text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(
            f"{readme} has no `{README_BEGIN}...` / `{README_END}` markers; add them where the table goes."
        )
    header = f"{README_BEGIN}{results_path} -->\n"
    text = text[:begin] + header + readme_table(report, README_STEPS) + "\n" + text[end:]
    readme.write_text(text)
