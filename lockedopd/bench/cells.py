"""A grid's cells: train one (in this process or a fresh interpreter), resume it, tidy it once finished, and read
the finished ones (from disk, or from the grid's archive, :mod:`lockedopd.bench.archive`).

A cell is finished once its ``cell.json`` exists; a cell in flight trains with ``resume=true``, so a killed
invocation continues from the cell's last checkpoint. Checkpoints (and adapter weights) of a finished cell are
deleted; its small files stay.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lockedopd.bench.accuracy_report import cell_accuracy
from lockedopd.bench.archive import CELL_FILE, CellFiles, all_cells, small_files
from lockedopd.bench.experiment import Experiment, cell_config, cell_overrides, has_own_student, in_root
from lockedopd.bench.geometry import GEOMETRY_FILE
from lockedopd.opd.built_models import built_model_identity, is_built_source
from lockedopd.runtime.provenance import package_versions

REMOVE_WHEN_DONE = ("checkpoints", "lock", "adapter", "vllm_student")
EVAL_KEYS = ("eval_fixed_text_kl", "eval_fixed_text_forward_kl")


def finished_cells(exp: Experiment) -> set[tuple[str, int]]:
    """The experiment's finished cells, on disk or archived."""
    return set(all_cells(exp.out_dir)) & set(exp.cells())


def cleanup(cell: Path) -> None:
    """Delete what a finished cell does not need (checkpoints, the lock's base weights, adapter, vLLM student copy)."""
    for name in REMOVE_WHEN_DONE:
        target = cell / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
    for weights in cell.glob("*.safetensors"):
        weights.unlink()


def _records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def used_built_models(config: Any) -> dict[str, dict[str, str]]:
    """``{source: {"key", "weights_sha256"}}`` of the built models (``built:RECIPE``) a cell's config trains or
    scores with: its student and its teacher."""
    sources = {config.student.source, config.teacher.model.source}
    return {source: built_model_identity(source) for source in sorted(sources) if is_built_source(source)}


def run_cell(exp: Experiment, method: str, seed: int) -> dict[str, Any]:
    """Train cell (method, seed) in this process (resuming from its checkpoint), then write ``cell.json``."""
    import torch

    from lockedopd.opd import OPDTrainer
    from lockedopd.runtime.checkpoint import atomic_write_text, list_checkpoints

    if exp.threads:
        torch.set_num_threads(exp.threads)
    cell = exp.cell_dir(method, seed)
    config = cell_config(exp, method, seed)
    saved = list_checkpoints(cell) if cell.is_dir() else []
    resumed_from = saved[-1][0] if saved else None
    started = time.time()
    try:
        with in_root(exp):  # the recipes of built models are named relative to the root
            summary = OPDTrainer.from_config(config).train()
            built_models = used_built_models(config)
    except BaseException:
        if exp.isolation == "inline":
            add_wall(cell, time.time() - started)
        raise
    if exp.geometry:  # before cleanup deletes the checkpoints it reads
        from lockedopd.bench.geometry import measure_cell_geometry

        measure_cell_geometry(cell)
    wall = time.time() - started
    steps = [r for r in _records((cell / "metrics.jsonl").read_text()) if "trainable_params" in r]
    previous = cell / "wall_s.json"  # seconds spent in earlier, interrupted invocations of this cell
    earlier = json.loads(previous.read_text())["seconds"] if previous.is_file() else 0.0
    info = {
        "method": method,
        "seed": seed,
        "own_student": has_own_student(exp, method),
        "overrides": cell_overrides(exp, method, seed),
        "wall_s": round(wall + earlier, 1),
        "interrupted_wall_s": round(earlier, 1),
        "resumed_from": resumed_from,
        "mean_step_time_s": summary.get("mean_step_time_s"),
        "trainable_params": steps[-1]["trainable_params"] if steps else None,
        "optimizer_state_bytes": steps[-1]["optimizer_state_bytes"] if steps else None,
        "lock_step": summary.get("lock_step"),
        "lock_reason": summary.get("lock_reason"),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "built_models": built_models,
        "environment": package_versions(),
    }
    atomic_write_text(cell / CELL_FILE, json.dumps(info, indent=2))
    cleanup(cell)
    return info


def child_command(exp: Experiment, experiment_path: Path, *extra: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a fresh interpreter running the quality harness on this experiment
    (``python -m lockedopd.bench.quality``, importing the same ``lockedopd`` as this process)."""
    import lockedopd

    cmd = [sys.executable, "-m", "lockedopd.bench.quality", str(Path(experiment_path).resolve())]
    cmd += ["--out", str(exp.out_dir), *extra]
    package_parent = str(Path(lockedopd.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)}
    return cmd, env


def run_cell_in_process(exp: Experiment, experiment_path: Path, method: str, seed: int) -> None:
    """Run one cell in a fresh interpreter (the harness with ``--cell``); raise if it fails."""
    cell = exp.cell_dir(method, seed)
    cell.mkdir(parents=True, exist_ok=True)
    started = time.time()
    cmd, env = child_command(exp, experiment_path, "--cell", method, str(seed))
    if exp.threads:  # OpenMP reads it at start-up, before torch.set_num_threads in the cell
        env["OMP_NUM_THREADS"] = str(exp.threads)
    proc = subprocess.run(cmd, cwd=exp.root_dir, env=env)
    if proc.returncode != 0:
        add_wall(cell, time.time() - started)
        raise RuntimeError(
            f"cell {method}/seed{seed} failed (exit {proc.returncode}); fix the cause and rerun the same command: "
            "it resumes from the cell's last checkpoint."
        )


def add_wall(cell: Path, seconds: float) -> None:
    """Remember the seconds an interrupted invocation spent on a cell (added to its wall time when it finishes)."""
    path = cell / "wall_s.json"
    earlier = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
    path.write_text(json.dumps({"seconds": earlier + seconds}))


def parse_cell(files: CellFiles) -> dict[str, Any]:
    """A finished cell's facts from its files: ``cell.json``, the summary and its evaluations by step."""
    info = json.loads(files[CELL_FILE])
    summary = json.loads(files["summary.json"])
    records = _records(files["metrics.jsonl"].decode())
    evals = {r["step"]: r for r in records if "eval_reverse_kl" in r}
    return {
        **info,
        "summary": summary,
        "eval_reverse_kl": {step: r["eval_reverse_kl"] for step, r in evals.items()},
        **{key: {step: r[key] for step, r in evals.items() if key in r} for key in EVAL_KEYS},
        "final_step": max((r["step"] for r in records if any(k.startswith("eval_") for k in r)), default=None),
        **cell_accuracy(records),
        **({"geometry": json.loads(files[GEOMETRY_FILE])} if GEOMETRY_FILE in files else {}),
    }


def read_cell(cell: Path) -> dict[str, Any]:
    """A finished cell's facts (:func:`parse_cell`) from its folder."""
    return parse_cell(small_files(cell))


def collect(exp: Experiment) -> dict[str, dict[int, dict[str, Any]]]:
    """Every finished cell of the experiment, ``{method: {seed: facts}}`` in run order: archived cells, each
    replaced by its folder on disk where there is one."""
    files = all_cells(exp.out_dir)
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    for method, seed in exp.cells():
        if (method, seed) in files:
            cells.setdefault(method, {})[seed] = parse_cell(files[(method, seed)])
    return cells
