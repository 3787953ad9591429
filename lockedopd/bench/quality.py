"""Quality of OPD training methods: a method x training-seed grid of one recipe, one ``OPDTrainer`` run per cell.

    lockedopd bench quality benchmarks/experiments/quality_smollm2.yaml [--out DIR] [--methods a,b] [--seeds 0,1]
    lockedopd bench quality benchmarks/experiments/quality_smollm2.yaml --rerender   # reports only
    lockedopd bench quality benchmarks/experiments/quality_smollm2.yaml --pack       # finished cells -> cells.tar.xz
    python -m lockedopd.bench.quality ...                                             # the same

The experiment YAML (:mod:`lockedopd.bench.experiment`) names the recipe, the methods and the seeds. Resumable
cell by cell (:mod:`lockedopd.bench.cells`): a finished cell, on disk or in the grid's archive
(:mod:`lockedopd.bench.archive`), is never recomputed; a cell in flight resumes from its last checkpoint. After every
cell the reports are rewritten from all finished cells (:mod:`lockedopd.bench.quality_report`): ``results.json``,
``results.md`` (methods of the experiment that cannot run are listed as "not run") and ``quality.png``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from lockedopd.bench.archive import pack
from lockedopd.bench.cells import child_command, cleanup, finished_cells, run_cell, run_cell_in_process
from lockedopd.bench.experiment import Experiment, load_experiment, method_errors
from lockedopd.bench.quality_markdown import markdown_report, update_readme
from lockedopd.bench.quality_report import write_reports
from lockedopd.bench.teacher import measure_teacher_accuracy


def refresh_reports(exp: Experiment, experiment_path: Path | None, errors: dict[str, str]) -> None:
    """Rewrite the reports after a cell; a reporting error is printed, never allowed to stop the grid.

    With ``isolation=process`` a fresh interpreter renders them (``--rerender``), so improvements to the reporting
    code take effect in a long grid without restarting it.
    """
    try:
        if exp.isolation == "process" and experiment_path is not None:
            cmd, env = child_command(exp, experiment_path, "--rerender", "--quiet")
            proc = subprocess.run(cmd, cwd=exp.root_dir, env=env)
            if proc.returncode != 0:
                print(f"[quality] warning: rendering the reports failed (exit {proc.returncode})", flush=True)
        else:
            write_reports(exp, errors)
    except Exception as exc:  # the cells are what matters; the reports can be rerendered later
        print(f"[quality] warning: rendering the reports failed: {type(exc).__name__}: {exc}", flush=True)


def _check_selection(exp: Experiment, methods: list[str] | None, seeds: list[int] | None) -> None:
    """Refuse methods or seeds the experiment does not have, before anything runs."""
    unknown = sorted(set(methods or []) - set(exp.methods))
    if unknown:
        raise ValueError(f"--methods: {unknown[0]!r} is not a method of the experiment ({list(exp.methods)}).")
    known_seeds = {seed for _, seed in exp.cells()}
    outside = sorted(set(seeds or []) - known_seeds)
    if outside:
        raise ValueError(
            f"--seeds: seed {outside[0]} is not a seed of the experiment (seeds {exp.seeds}, extra_seeds "
            f"{exp.extra_seeds or {}}); add it to `seeds` (or to `extra_seeds` of the methods that need it, `full` "
            "among them) in the experiment's YAML, then rerun."
        )


def run(
    exp: Experiment,
    experiment_path: Path | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    max_cells: int | None = None,
) -> dict[str, Any]:
    """Run every unfinished cell (optionally only some methods / seeds / at most ``max_cells`` of them).

    Returns ``{"computed": [cells run now], "skipped": [finished cells], "report": results}``.
    """
    errors = method_errors(exp)
    _check_selection(exp, methods, seeds)
    computed, skipped = [], []
    measure_teacher_accuracy(exp)
    finished = finished_cells(exp)
    for method, seed in exp.cells():
        if (methods and method not in methods) or (seeds is not None and seed not in seeds) or method in errors:
            continue
        if (method, seed) in finished:
            skipped.append((method, seed))
            if exp.cell_dir(method, seed).is_dir():
                cleanup(exp.cell_dir(method, seed))
            continue
        if max_cells is not None and len(computed) >= max_cells:
            break
        print(f"[quality] cell {method}/seed{seed} ...", flush=True)
        if exp.isolation == "process":
            if experiment_path is None:
                raise ValueError("isolation=process needs the experiment's path; pass experiment_path.")
            run_cell_in_process(exp, experiment_path, method, seed)
        else:
            run_cell(exp, method, seed)
        computed.append((method, seed))
        refresh_reports(exp, experiment_path, errors)
        print(f"[quality] cell {method}/seed{seed} finished; reports in {exp.out_dir}", flush=True)
    report = write_reports(exp, errors)
    return {"computed": computed, "skipped": skipped, "report": report}


def build_parser() -> argparse.ArgumentParser:
    """The harness's arguments (``lockedopd bench quality ...``)."""
    p = argparse.ArgumentParser(
        prog="lockedopd bench quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("experiment", help="experiment YAML (benchmarks/experiments/quality_*.yaml)")
    p.add_argument("--out", default=None, help="output directory (default: the experiment's `out`)")
    p.add_argument("--methods", default=None, help="comma list: run only these methods")
    p.add_argument("--seeds", default=None, help="comma list: run only these seeds")
    p.add_argument("--max-cells", type=int, default=None, help="stop after computing this many cells")
    p.add_argument("--rerender", action="store_true", help="only rewrite the reports from the finished cells")
    p.add_argument("--pack", action="store_true", help="only pack the finished cells into OUT/cells.tar.xz")
    p.add_argument("--quiet", action="store_true", help="do not print results.md")
    p.add_argument("--readme", default=None, help="also rewrite this README's quality-table block from results.json")
    p.add_argument("--cell", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)  # one cell, internal
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    exp = load_experiment(args.experiment, args.out)
    if args.cell:
        run_cell(exp, args.cell[0], int(args.cell[1]))
        return 0
    if args.pack:
        path = pack(exp.out_dir)
        print(f"[quality] {'no finished cells to pack' if path is None else f'packed into {path}'}", flush=True)
        return 0
    if args.rerender:
        report = write_reports(exp)
    else:
        methods = args.methods.split(",") if args.methods else None
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        report = run(exp, Path(args.experiment), methods, seeds, args.max_cells)["report"]
    if args.readme:
        results = exp.out_dir / "results.json"
        shown = results.relative_to(exp.root_dir) if results.is_relative_to(exp.root_dir) else results
        update_readme(report, Path(args.readme), str(shown))
    if not args.quiet:
        print(markdown_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
