"""A quality grid's report from its finished cells: ``results.json`` (:func:`build_report`), ``results.md``
(:mod:`lockedopd.bench.quality_markdown`), ``quality.png`` and, on a task grid, ``accuracy.png``.

``results.json`` holds per method its seeds, held-out reverse KL (and KL on the teacher's fixed text) per eval step
as mean / std / min / max over seeds, the final KL, the share of full OPD's post-lock gain per seed and as a mean
with a 95% t-interval, trainable parameters and optimizer-state bytes of the last step (after the lock), wall time;
methods are compared on the experiment's common seeds, methods with extra seeds are also reported over all of them.
"""

from __future__ import annotations

import json
from typing import Any

from lockedopd.bench.accuracy_report import ACCURACY_LR_RULE, aggregate_accuracy, select_by_accuracy
from lockedopd.bench.aggregate import Cells, aggregate_on_common_seeds, every_seed_view
from lockedopd.bench.cells import collect
from lockedopd.bench.experiment import Experiment, method_errors
from lockedopd.bench.monitor import cell_ranking_agreement, ranking_agreement
from lockedopd.bench.paper_report import findings_markdown, paper_section, plot_paper
from lockedopd.bench.plots import plot_accuracy, plot_quality
from lockedopd.bench.quality_markdown import markdown_report
from lockedopd.bench.targets import check_targets
from lockedopd.bench.teacher import read_teacher_accuracy

LR_SELECTION_RULE = (
    "lowest mean final KL on the teacher's fixed greedy text (eval_fixed_text_kl); the held-out on-policy KL is "
    "reported but does not choose: a high lr drives it down by collapsing onto a few modes"
)


def select_learning_rates(methods: dict[str, Any], screens: dict[str, list[str]]) -> dict[str, Any]:
    """Each screen's chosen method by :data:`LR_SELECTION_RULE`, from ``results.json``'s ``methods`` section.

    Returns ``{family: {"candidates": {name: {"final_reverse_kl", "final_fixed_text_kl"} | None}, "selected": name
    | None, "complete": bool}}``: ``selected`` is ``None`` until some candidate has a fixed-text KL; ``complete``
    is ``False`` while a candidate has not run or ran without the fixed-text evaluation (the choice may change).
    """
    out: dict[str, Any] = {}
    for family, members in screens.items():
        candidates: dict[str, Any] = {}
        for name in members:
            m = methods.get(name)
            candidates[name] = None if m is None else {
                "final_reverse_kl": m.get("final_reverse_kl", {}).get("mean"),
                "final_fixed_text_kl": m.get("final_fixed_text_kl", {}).get("mean"),
            }  # fmt: skip
        scored = {
            n: c["final_fixed_text_kl"] for n, c in candidates.items() if c and c["final_fixed_text_kl"] is not None
        }
        out[family] = {
            "candidates": candidates,
            "selected": min(scored, key=scored.__getitem__) if scored else None,
            "complete": len(scored) == len(members),
        }
    return out


def lr_selection(exp: Experiment, methods: dict[str, Any]) -> dict[str, Any]:
    """The learning-rate screens' choices: by accuracy on a task grid, else by the fixed-text KL."""
    if exp.task:
        return {"rule": ACCURACY_LR_RULE, "families": select_by_accuracy(methods, exp.lr_screens)}
    return {"rule": LR_SELECTION_RULE, "families": select_learning_rates(methods, exp.lr_screens)}


def _accuracy_section(exp: Experiment, cells: Cells, aggregated: dict[str, Any]) -> dict[str, Any]:
    """A task grid's accuracy keys of ``results.json``; merges each method's accuracy into ``aggregated``."""
    common = {m: {s: c for s, c in by_seed.items() if s in exp.seeds} for m, by_seed in cells.items()}
    section = aggregate_accuracy(common, list(exp.methods))
    for name, entry in section["methods"].items():
        aggregated.setdefault(name, {}).update(entry)
    teacher = read_teacher_accuracy(exp)
    return {
        "task": exp.task,
        **({"targets": check_targets(exp.parsed_targets(), section, aggregated)} if exp.targets else {}),
        "teacher_accuracy": None if teacher is None else teacher["greedy_accuracy"],
        "teacher_accuracy_sampled": None if teacher is None else teacher["sampled_accuracy"],
        "teacher": teacher,
        "student_start_accuracy": section["student_start_accuracy"]["mean"],
        "reference": section["reference"],
        "accuracy": section,
    }


def built_model_builds(cells: Cells) -> dict[str, dict[str, list[str]]]:
    """``{source: {weights digest: ["method/seedN", ...]}}`` over the cells that record their built models (cells
    finished before cells recorded them are left out)."""
    builds: dict[str, dict[str, list[str]]] = {}
    for method, by_seed in cells.items():
        for seed, cell in by_seed.items():
            for source, identity in (cell.get("built_models") or {}).items():
                builds.setdefault(source, {}).setdefault(identity["weights_sha256"], []).append(f"{method}/seed{seed}")
    return builds


def build_report(exp: Experiment, errors: dict[str, str]) -> dict[str, Any]:
    """The whole ``results.json`` content, from the finished cells (archived or on disk)."""
    cells = collect(exp)
    methods = list(exp.methods)
    pending = [f"{m}/seed{s}" for m, s in exp.cells() if m not in errors and s not in cells.get(m, {})]
    aggregated, all_seeds = aggregate_on_common_seeds(cells, methods, exp.seeds)
    every_seed = every_seed_view(aggregated, all_seeds)
    accuracy = _accuracy_section(exp, cells, aggregated) if exp.task else {}
    return {
        **accuracy,
        "experiment": exp.name,
        "base_config": exp.base_config,
        "overrides": exp.overrides,
        "method_overrides": exp.methods,
        "seeds": exp.seeds,
        **({"extra_seeds": exp.extra_seeds} if exp.extra_seeds else {}),
        "methods": aggregated,
        **({"all_seeds": all_seeds} if all_seeds else {}),
        # the monitor is calibrated on every seed a method ran (each estimate against the shares of its own seeds)
        "monitor_ranking": ranking_agreement(every_seed),
        "monitor_ranking_next_batch": ranking_agreement(every_seed, "next_batch_progress_share"),
        "monitor_ranking_by_run": cell_ranking_agreement(every_seed),
        **({"lr_selection": lr_selection(exp, aggregated)} if exp.lr_screens else {}),
        **(paper_section(cells) if exp.report == "paper" else {}),
        "not_run": errors,
        "pending_cells": pending,
        "built_models": built_model_builds(cells),
    }


def write_reports(exp: Experiment, errors: dict[str, str] | None = None) -> dict[str, Any]:
    """Rewrite ``results.json``, ``results.md`` and ``quality.png`` (and ``accuracy.png``) from the finished cells."""
    from lockedopd.runtime.checkpoint import atomic_write_text

    errors = method_errors(exp) if errors is None else errors
    report = build_report(exp, errors)
    out = exp.out_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(report, indent=2))
    atomic_write_text(out / "results.md", markdown_report(report))
    plot_quality(report, out / "quality.png")
    if exp.task:
        plot_accuracy(report, out / "accuracy.png")
    if exp.report == "paper":
        atomic_write_text(out / "findings.md", findings_markdown(report))
        plot_paper(report, out)
    return report
