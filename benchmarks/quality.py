"""Quality of OPD training methods: a method x training-seed grid of one recipe, one ``OPDTrainer`` run per cell.

    python benchmarks/quality.py benchmarks/experiments/quality_smollm2.yaml [--out DIR] [--methods a,b] [--seeds 0,1]
    python benchmarks/quality.py benchmarks/experiments/quality_smollm2.yaml --rerender   # reports only
    lockedopd bench quality benchmarks/experiments/quality_smollm2.yaml                    # the same, via the CLI

An experiment YAML names a base config (a recipe), overrides common to every cell, the methods (name -> config
overrides, e.g. ``full: {lock.enabled: false}``), the training seeds and the output directory (see
``benchmarks/experiments/quality_tiny.yaml``). Cell ``(method, seed)`` trains the base config with the common
overrides, the method's overrides and ``seed=<seed>`` into ``OUT/cells/<method>/seed<seed>/``.

Resumable cell by cell: a cell whose ``cell.json`` exists is finished and never recomputed; a cell in flight trains
with ``resume=true``, so a killed invocation continues from the cell's last checkpoint; checkpoints (and adapter
weights) of a finished cell are deleted, its small files (``metrics.jsonl``, ``summary.json``, ``config.yaml``,
``cell.json``) stay. After every cell the reports are rewritten from all finished cells:

- ``results.json``: per method its seeds, held-out reverse KL (and KL on the teacher's fixed text) per eval step as
  mean / std / min / max over seeds, the final KL, the share of full OPD's post-lock gain per seed and as a mean with
  a 95% t-interval, trainable parameters and optimizer-state bytes of the last step (after the lock), wall time;
- ``results.md``: the same as tables (methods of the experiment that cannot run are listed as "not run");
- ``quality.png``: held-out reverse KL (and fixed-text KL) vs step, mean +- spread (min..max) over seeds.

Share of full OPD's post-lock gain of a method on seed s:
``(KL_full,s(L) - KL_end(method, s)) / (KL_full,s(L) - KL_end(full, s))`` with ``L`` the method's lock step and
``KL_full,s(L)`` the same seed's full run's held-out KL at step L (full runs must evaluate at L: pick ``eval_steps``
dividing the lock step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
from accuracy_report import (  # noqa: E402
    ACCURACY_LR_RULE,
    accuracy_markdown,
    aggregate_accuracy,
    cell_accuracy,
    plot_accuracy,
    select_by_accuracy,
)

REFERENCE = "full"
ORDERS = ("method_major", "seed_major")
ISOLATIONS = ("process", "inline")
CELL_FILE = "cell.json"
REMOVE_WHEN_DONE = ("checkpoints", "lock", "adapter", "vllm_student")
# two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (a statistical table, not a result)
T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


@dataclass
class Experiment:
    """A quality grid.

    Attributes:
        name: experiment name (the YAML's stem unless given).
        base_config: the recipe every cell starts from (path relative to the repository root or absolute).
        overrides: dotted-key overrides applied to every cell (e.g. ``eval_steps: 4``).
        methods: method name -> its dotted-key overrides, in run order. ``full`` (the reference) is required for
            the share of full OPD's gain.
        seeds: training seeds (``seed=<s>`` per cell).
        out: output directory (relative to the repository root or absolute).
        order: ``method_major`` (all seeds of one method, then the next) or ``seed_major``.
        isolation: ``process`` (each cell in a fresh interpreter: frees the teacher engine and memory between
            cells) or ``inline`` (in this process: tests, tiny models).
        threads: torch threads per cell (``null`` = torch's default).
        fixed_text_cache: share the teacher's fixed-text completions between cells in ``OUT/fixed_text/`` (when
            the config sets ``eval_fixed_text``).
        lr_screens: learning-rate screens: a family name -> the methods that differ only in learning rate. The
            report picks each family's lr by :func:`select_learning_rates` (lowest final KL on the teacher's fixed
            text).
        extra_seeds: method -> seeds it runs beyond ``seeds`` (where a method's interval is too wide to tell a
            target). Its share on such a seed needs the same seed's ``full`` run, so ``full`` must list them too.
        task: the verifiable task the cells measure accuracy on (their config's ``accuracy`` section); accuracy then
            leads the report (:mod:`accuracy_report`), and only the first method's cells evaluate the step-0 student.
        teacher_model: the teacher's model source (e.g. ``built:RECIPE.yaml``), scored once with the cells' accuracy
            settings into ``OUT/teacher_accuracy.json``.
    """

    name: str
    base_config: str
    methods: dict[str, dict[str, Any]]
    seeds: list[int]
    out: str
    overrides: dict[str, Any] = field(default_factory=dict)
    order: str = "method_major"
    isolation: str = "process"
    threads: int | None = None
    fixed_text_cache: bool = True
    lr_screens: dict[str, list[str]] = field(default_factory=dict)
    extra_seeds: dict[str, list[int]] = field(default_factory=dict)
    task: str | None = None
    teacher_model: str | None = None

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("experiment: methods is empty; name at least `full` and one method to compare.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"experiment: seeds must be a non-empty list of distinct integers, got {self.seeds}.")
        if self.order not in ORDERS:
            raise ValueError(f"experiment: order={self.order!r} is not one of {list(ORDERS)}.")
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"experiment: isolation={self.isolation!r} is not one of {list(ISOLATIONS)}.")
        for family, members in self.lr_screens.items():
            if not isinstance(members, list) or not members or any(m not in self.methods for m in members):
                raise ValueError(
                    f"experiment: lr_screens.{family} must list methods of this experiment, got {members!r}; "
                    f"methods: {list(self.methods)}."
                )
        for method, extra in self.extra_seeds.items():
            if method not in self.methods:
                raise ValueError(f"experiment: extra_seeds names {method!r}, not a method of {list(self.methods)}.")
            if not isinstance(extra, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in extra):
                raise ValueError(f"experiment: extra_seeds.{method} must be a list of integers, got {extra!r}.")
            clash = sorted(set(extra) & set(self.seeds)) or sorted({s for s in extra if extra.count(s) > 1})
            if clash:
                raise ValueError(
                    f"experiment: extra_seeds.{method} repeats seed {clash[0]} (already in seeds or listed twice); "
                    "list only seeds beyond `seeds`, once."
                )
            missing = sorted(set(extra) - set(self.extra_seeds.get(REFERENCE, [])))
            if method != REFERENCE and REFERENCE in self.methods and missing:
                raise ValueError(
                    f"experiment: extra_seeds.{method} runs seed {missing[0]} but {REFERENCE!r} does not; the share "
                    f"of full OPD's gain needs the same seed's {REFERENCE} run: add it to extra_seeds.{REFERENCE}."
                )
        for name, overrides in self.methods.items():
            if not isinstance(overrides, dict):
                raise ValueError(
                    f"experiment: method {name!r} must map dotted config keys to values (e.g. lock.enabled: false), "
                    f"got {overrides!r}; use {{}} for the base config unchanged."
                )

    @property
    def out_dir(self) -> Path:
        """The output directory, absolute."""
        return _repo_path(self.out)

    def seeds_of(self, method: str) -> list[int]:
        """The training seeds of one method: ``seeds``, then its ``extra_seeds``."""
        return [*self.seeds, *self.extra_seeds.get(method, [])]

    def cells(self) -> list[tuple[str, int]]:
        """All (method, seed) cells in run order (extra seeds after the common ones in ``seed_major`` order)."""
        if self.order == "method_major":
            return [(m, s) for m in self.methods for s in self.seeds_of(m)]
        all_seeds = sorted({s for m in self.methods for s in self.seeds_of(m)}, key=self._seed_rank)
        return [(m, s) for s in all_seeds for m in self.methods if s in self.seeds_of(m)]

    def _seed_rank(self, seed: int) -> tuple[int, int]:
        """Sort key of the ``seed_major`` order: the common seeds as listed, then the extra ones ascending."""
        return (0, self.seeds.index(seed)) if seed in self.seeds else (1, seed)

    def cell_dir(self, method: str, seed: int) -> Path:
        """Where cell (method, seed) trains and keeps its results."""
        return self.out_dir / "cells" / method / f"seed{seed}"


def _repo_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else REPO / path


def load_experiment(path: str | Path, out: str | None = None) -> Experiment:
    """Read an experiment YAML; unknown keys raise ``ValueError`` naming the allowed ones."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment {path} does not exist; see benchmarks/experiments/quality_*.yaml.")
    data = yaml.safe_load(path.read_text()) or {}
    allowed = set(Experiment.__dataclass_fields__)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"experiment {path}: unknown key {unknown[0]!r}; allowed: {sorted(allowed)}.")
    data.setdefault("name", path.stem)
    data.setdefault("out", f"benchmarks/results/{data['name']}")
    if out is not None:
        data["out"] = str(Path(out).resolve())
    missing = [k for k in ("base_config", "methods", "seeds") if k not in data]
    if missing:
        raise ValueError(f"experiment {path}: missing {missing[0]!r} (needs base_config, methods, seeds).")
    data["methods"] = {name: dict(overrides or {}) for name, overrides in data["methods"].items()}
    return Experiment(**data)


def _override_list(mapping: dict[str, Any]) -> list[str]:
    """``{"lock.enabled": False}`` -> ``["lock.enabled=false"]`` (JSON values, which the YAML parser reads back)."""
    return [f"{key}={json.dumps(value)}" for key, value in mapping.items()]


def cell_overrides(exp: Experiment, method: str, seed: int) -> list[str]:
    """The config overrides of one cell: common ones, the method's, then seed, output_dir and resume."""
    overrides = _override_list(exp.overrides) + _override_list(exp.methods[method])
    overrides += [f"seed={seed}", f"output_dir={exp.cell_dir(method, seed)}", "resume=true"]
    if exp.task and method != next(iter(exp.methods)):  # the step-0 student is the same for every method of a seed:
        overrides.append("eval_at_start=false")  # only the experiment's first method evaluates it
    if exp.fixed_text_cache:
        overrides.append(f"eval_fixed_text_path={exp.out_dir / 'fixed_text'}")
    return overrides


def cell_config(exp: Experiment, method: str, seed: int):
    """The :class:`~lockedopd.opd.OPDConfig` of one cell (raises ``ValueError`` when the method cannot run)."""
    from lockedopd.opd import load_config

    return load_config(_repo_path(exp.base_config), cell_overrides(exp, method, seed))


def method_errors(exp: Experiment) -> dict[str, str]:
    """Methods whose config the trainer rejects (e.g. a method it cannot run yet), with the reason."""
    errors = {}
    for method in exp.methods:
        try:
            cell_config(exp, method, exp.seeds[0])
        except (ValueError, TypeError) as exc:
            errors[method] = str(exc).splitlines()[0]
    return errors


def is_finished(exp: Experiment, method: str, seed: int) -> bool:
    """A cell is finished once its ``cell.json`` (written after the trainer's summary) exists."""
    return (exp.cell_dir(method, seed) / CELL_FILE).is_file()


def _cleanup(cell: Path) -> None:
    """Delete what a finished cell does not need (checkpoints, the lock's base weights, adapter, vLLM student copy)."""
    for name in REMOVE_WHEN_DONE:
        target = cell / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
    for weights in cell.glob("*.safetensors"):
        weights.unlink()


def run_cell(exp: Experiment, method: str, seed: int) -> dict[str, Any]:
    """Train cell (method, seed) in this process (resuming from its checkpoint), then write ``cell.json``."""
    import torch

    from lockedopd.opd import OPDTrainer

    if exp.threads:
        torch.set_num_threads(exp.threads)
    cell = exp.cell_dir(method, seed)
    config = cell_config(exp, method, seed)
    from lockedopd.runtime.checkpoint import list_checkpoints

    saved = list_checkpoints(cell) if cell.is_dir() else []
    resumed_from = saved[-1][0] if saved else None
    started = time.time()
    try:
        trainer = OPDTrainer.from_config(config)
        summary = trainer.train()
    except BaseException:
        if exp.isolation == "inline":
            _add_wall(cell, time.time() - started)
        raise
    wall = time.time() - started
    records = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "trainable_params" in r]
    previous = cell / "wall_s.json"  # seconds spent in earlier, interrupted invocations of this cell
    earlier = json.loads(previous.read_text())["seconds"] if previous.is_file() else 0.0
    info = {
        "method": method,
        "seed": seed,
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
    }
    from lockedopd.runtime.checkpoint import atomic_write_text

    atomic_write_text(cell / CELL_FILE, json.dumps(info, indent=2))
    _cleanup(cell)
    return info


def _run_cell_in_process(exp: Experiment, experiment_path: Path, method: str, seed: int) -> None:
    """Run one cell in a fresh interpreter (the same script with ``--cell``); raise if it fails."""
    cell = exp.cell_dir(method, seed)
    cell.mkdir(parents=True, exist_ok=True)
    started = time.time()
    cmd = [sys.executable, str(Path(__file__).resolve()), str(experiment_path), "--out", str(exp.out_dir)]
    cmd += ["--cell", method, str(seed)]
    env = dict(os.environ)
    if exp.threads:  # OpenMP reads it at start-up, before torch.set_num_threads in the cell
        env["OMP_NUM_THREADS"] = str(exp.threads)
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        _add_wall(cell, time.time() - started)
        raise RuntimeError(
            f"cell {method}/seed{seed} failed (exit {proc.returncode}); fix the cause and rerun the same command: "
            "it resumes from the cell's last checkpoint."
        )


def _add_wall(cell: Path, seconds: float) -> None:
    """Remember the seconds an interrupted invocation spent on a cell (added to its wall time when it finishes)."""
    path = cell / "wall_s.json"
    earlier = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
    path.write_text(json.dumps({"seconds": earlier + seconds}))


# ----------------------------------------------------------------------------------------------- aggregation
def t_interval(values: list[float]) -> dict[str, Any]:
    """Mean and 95% Student-t interval of ``values`` (``low``/``high`` are None with fewer than two values)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "std": None, "n": 0}
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "std": None, "n": n}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    half = t * std / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "std": std, "n": n}


def _spread(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def read_cell(cell: Path) -> dict[str, Any]:
    """A finished cell's facts: ``cell.json``, the summary and its evaluations by step."""
    info = json.loads((cell / CELL_FILE).read_text())
    summary = json.loads((cell / "summary.json").read_text())
    records = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = {r["step"]: r for r in records if "eval_reverse_kl" in r}
    return {
        **info,
        "summary": summary,
        "eval_reverse_kl": {step: r["eval_reverse_kl"] for step, r in evals.items()},
        **{
            key: {step: r[key] for step, r in evals.items() if key in r}
            for key in ("eval_fixed_text_kl", "eval_fixed_text_forward_kl")
        },
        "final_step": max(evals) if evals else None,
        **cell_accuracy(records),
    }


def full_kl_at(full_cell: dict[str, Any], step: int) -> tuple[float, bool]:
    """The full run's held-out KL at ``step`` and whether it had to be interpolated.

    Exact when the run evaluated at ``step``; otherwise linear between the evaluations either side of it (flagged,
    so a report can say so). Raises ``ValueError`` when ``step`` lies outside the evaluated range.
    """
    kl = full_cell["eval_reverse_kl"]
    if step in kl:
        return kl[step], False
    before = [s for s in kl if s < step]
    after = [s for s in kl if s > step]
    if not before or not after:
        raise ValueError(
            f"the full run of seed {full_cell['seed']} has no held-out evaluation around step {step} (it evaluated "
            f"at {sorted(kl)}); set eval_steps so that it divides the lock step."
        )
    lo, hi = max(before), min(after)
    return kl[lo] + (kl[hi] - kl[lo]) * (step - lo) / (hi - lo), True


def share_of_full_gain(method_cell: dict[str, Any], full_cell: dict[str, Any]) -> float | None:
    """(KL_full(L) - KL_end(method)) / (KL_full(L) - KL_end(full)), L = the method's lock step; None if undefined.

    Both cells are of the same training seed; KL_full(L) comes from :func:`full_kl_at`. A method that never locks
    (GaLore, or any whole-run optimizer) is measured over the whole run, L = 0. None when full OPD made no progress
    after L.
    """
    lock_step = method_cell.get("lock_step") or 0
    start, _ = full_kl_at(full_cell, lock_step)
    end_full = full_cell["eval_reverse_kl"][full_cell["final_step"]]
    end_method = method_cell["eval_reverse_kl"][method_cell["final_step"]]
    if start == end_full:
        return None
    return (start - end_method) / (start - end_full)


def aggregate(cells: dict[str, dict[int, dict[str, Any]]], methods: list[str]) -> dict[str, Any]:
    """``results.json``'s ``methods`` section from finished cells ``{method: {seed: read_cell(...)}}``."""
    out: dict[str, Any] = {}
    full = cells.get(REFERENCE, {})
    for method in methods:
        by_seed = cells.get(method, {})
        if not by_seed:
            continue
        seeds = sorted(by_seed)
        entry: dict[str, Any] = {"seeds": seeds}
        for key in ("eval_reverse_kl", "eval_fixed_text_kl", "eval_fixed_text_forward_kl"):
            per_cell = [c.get(key, {}) for c in by_seed.values()]
            steps = sorted({step for values in per_cell for step in values})
            entry[key] = {str(step): _spread([v[step] for v in per_cell if step in v]) for step in steps}
        finals = [by_seed[s]["eval_reverse_kl"][by_seed[s]["final_step"]] for s in seeds]
        entry["final_reverse_kl"] = {**t_interval(finals), "per_seed": dict(zip(map(str, seeds), finals))}
        fixed = [by_seed[s].get("eval_fixed_text_kl", {}).get(by_seed[s]["final_step"]) for s in seeds]
        if all(v is not None for v in fixed):
            entry["final_fixed_text_kl"] = {**t_interval(fixed), "per_seed": dict(zip(map(str, seeds), fixed))}
        shares: dict[str, float] = {}
        missing: list[int] = []
        interpolated: list[int] = []
        for s in seeds:
            if method == REFERENCE:
                shares[str(s)] = 1.0
            elif s in full:
                value = share_of_full_gain(by_seed[s], full[s])
                if value is not None:
                    shares[str(s)] = value
                    if full_kl_at(full[s], by_seed[s]["lock_step"] or 0)[1]:
                        interpolated.append(s)
            else:
                missing.append(s)
        entry["share_of_full_gain"] = {**t_interval(list(shares.values())), "per_seed": shares}
        if missing:
            entry["share_of_full_gain"]["seeds_without_full_run"] = missing
        if interpolated:
            entry["share_of_full_gain"]["seeds_with_interpolated_kl_lock"] = interpolated
        entry["lock_step"] = {str(s): by_seed[s].get("lock_step") for s in seeds}
        entry["lock_reason"] = {str(s): by_seed[s].get("lock_reason") for s in seeds}
        last = by_seed[seeds[-1]]
        entry["trainable_params"] = last["trainable_params"]
        entry["optimizer_state_bytes"] = last["optimizer_state_bytes"]
        entry["wall_s"] = _spread([by_seed[s]["wall_s"] for s in seeds])
        entry["mean_step_time_s"] = _spread([by_seed[s]["mean_step_time_s"] for s in seeds])
        entry["per_seed_wall_s"] = {str(s): by_seed[s]["wall_s"] for s in seeds}
        monitor = monitor_figures([by_seed[s].get("summary", {}).get("monitor") for s in seeds], seeds)
        if monitor:
            entry["monitor"] = monitor
        out[method] = entry
    return out


MONITOR_FIGURES = (
    "captured_energy_mean",
    "random_baseline",
    "predicted_progress_share",
    "next_batch_progress_share",
    "cosine_to_adam_mean",
)
# the monitor's estimates of the share of unconstrained progress kept, each ranked against the measured shares
MONITOR_ESTIMATES = ("predicted_progress_share", "next_batch_progress_share")


def monitor_figures(summaries: list[dict[str, Any] | None], seeds: list[int] | None = None) -> dict[str, Any] | None:
    """The trajectory monitor's figures of a method, averaged over the seeds that have them, and whether it flagged
    the method: captured gradient energy at or below the threshold (5x a random subspace's) or a drift event.

    With ``seeds`` (one per summary) it also says which seeds each estimate of :data:`MONITOR_ESTIMATES` came from
    (``estimate_seeds``), so the estimate is ranked against the measured shares of those seeds only.
    """
    seeds = list(range(len(summaries))) if seeds is None else seeds
    present = [(s, m) for s, m in zip(seeds, summaries) if m and m.get("checks")]
    if not present:
        return None
    out: dict[str, Any] = {"seeds": len(present), "estimate_seeds": {}}
    for key in MONITOR_FIGURES:
        values = [m[key] for _, m in present if m.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
        if key in MONITOR_ESTIMATES:
            out["estimate_seeds"][key] = [s for s, m in present if m.get(key) is not None]
            out.setdefault("per_seed", {})[key] = {str(s): m[key] for s, m in present if m.get(key) is not None}
    present = [m for _, m in present]
    out["flagged"] = any(
        m.get("drift_events")
        or (m.get("captured_energy_mean") is not None and m.get("threshold") is not None
            and m["captured_energy_mean"] <= m["threshold"])
        for m in present
    )  # fmt: skip
    return out


def _measured_share(method: dict[str, Any], seeds: list[int] | None) -> float | None:
    """The method's mean measured share over ``seeds`` (all its seeds when None or when per-seed shares are absent)."""
    share = method["share_of_full_gain"]
    per_seed = share.get("per_seed")
    if seeds is None or per_seed is None:
        return share.get("mean")
    values = [per_seed[str(s)] for s in seeds if str(s) in per_seed]
    return sum(values) / len(values) if values else None


def ranking_agreement(methods: dict[str, Any], estimate: str = "predicted_progress_share") -> dict[str, Any] | None:
    """Does one of the monitor's estimates (:data:`MONITOR_ESTIMATES`) rank the methods as their measured shares
    do? Kendall's tau over the methods that have both (1 = same order), with both orders. Each method's measured
    share is the mean over the seeds its estimate came from."""
    pairs = {}
    for name, m in methods.items():
        monitor = m.get("monitor", {})
        if monitor.get(estimate) is None:
            continue
        measured = _measured_share(m, monitor.get("estimate_seeds", {}).get(estimate))
        if measured is not None:
            pairs[name] = (monitor[estimate], measured)
    if len(pairs) < 2:
        return None
    names = sorted(pairs)
    return {
        "estimate": estimate,
        "kendall_tau": _kendall_tau(pairs),
        "by_predicted_share": sorted(names, key=lambda n: -pairs[n][0]),
        "by_measured_share": sorted(names, key=lambda n: -pairs[n][1]),
    }


def _kendall_tau(pairs: dict[Any, tuple[float, float]]) -> float:
    """Kendall's tau-a of the (estimate, measured) pairs: (concordant − discordant) / all pairs."""
    keys = sorted(pairs, key=str)
    concordant = discordant = 0
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            sign = (pairs[a][0] - pairs[b][0]) * (pairs[a][1] - pairs[b][1])
            concordant += sign > 0
            discordant += sign < 0
    return (concordant - discordant) / (len(keys) * (len(keys) - 1) / 2)


def cell_ranking_agreement(methods: dict[str, Any], cells_of: str = "next_batch_progress_share") -> dict[str, Any]:
    """Run by run: on the cells (method, seed) that have the ``cells_of`` estimate, Kendall's tau between each
    estimate of :data:`MONITOR_ESTIMATES` and the cell's measured share — both estimates on the same runs, so
    they can be compared (a method's mean share mixes seeds whose full runs gained more or less)."""
    cells = {}
    for name, m in methods.items():
        per_seed = m.get("monitor", {}).get("per_seed", {})
        shares = m["share_of_full_gain"].get("per_seed", {})
        for seed in per_seed.get(cells_of, {}):
            if seed in shares and all(seed in per_seed.get(e, {}) for e in MONITOR_ESTIMATES):
                cells[f"{name}/seed{seed}"] = {e: per_seed[e][seed] for e in MONITOR_ESTIMATES} | {
                    "measured": shares[seed]
                }
    out: dict[str, Any] = {"cells": cells}
    if len(cells) >= 2:
        for estimate in MONITOR_ESTIMATES:
            out[estimate] = _kendall_tau({c: (v[estimate], v["measured"]) for c, v in cells.items()})
    return out


def collect(exp: Experiment) -> dict[str, dict[int, dict[str, Any]]]:
    """Every finished cell of the experiment, read from disk."""
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    for method, seed in exp.cells():
        if is_finished(exp, method, seed):
            cells.setdefault(method, {})[seed] = read_cell(exp.cell_dir(method, seed))
    return cells


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
                "final_reverse_kl": m["final_reverse_kl"]["mean"],
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


ALL_SEEDS_KEYS = ("seeds", "final_reverse_kl", "final_fixed_text_kl", "share_of_full_gain", "lock_step",
                  "per_seed_wall_s", "monitor")  # fmt: skip


def every_seed_view(methods: dict[str, Any], all_seeds: dict[str, Any] | None) -> dict[str, Any]:
    """Each method's entry over every seed it ran: its ``all_seeds`` entry where it ran extra seeds, else its
    common-seed entry."""
    return {name: (all_seeds or {}).get(name, entry) for name, entry in methods.items()}


def aggregate_on_common_seeds(
    cells: dict[str, dict[int, dict[str, Any]]], methods: list[str], common_seeds: list[int]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(methods, all_seeds)``: every method aggregated over the grid's common seeds only, so that methods are
    compared on the same seeds; and, for the methods that also ran extra seeds, their figures over all their seeds
    (:data:`ALL_SEEDS_KEYS`; each share against the same seed's full run)."""
    common = {m: {s: c for s, c in by_seed.items() if s in common_seeds} for m, by_seed in cells.items()}
    aggregated = aggregate(common, methods)
    wider = [m for m in methods if any(s not in common_seeds for s in cells.get(m, {}))]
    everything = aggregate(cells, wider) if wider else {}
    all_seeds = {m: {k: entry[k] for k in ALL_SEEDS_KEYS if k in entry} for m, entry in everything.items()}
    return aggregated, all_seeds


def lr_selection(exp: Experiment, methods: dict[str, Any]) -> dict[str, Any]:
    """The learning-rate screens' choices: by accuracy on a task grid, else by the fixed-text KL."""
    if exp.task:
        return {"rule": ACCURACY_LR_RULE, "families": select_by_accuracy(methods, exp.lr_screens)}
    return {"rule": LR_SELECTION_RULE, "families": select_learning_rates(methods, exp.lr_screens)}


def build_report(exp: Experiment, errors: dict[str, str]) -> dict[str, Any]:
    """The whole ``results.json`` content."""
    cells = collect(exp)
    methods = list(exp.methods)
    pending = [f"{m}/seed{s}" for m, s in exp.cells() if m not in errors and not is_finished(exp, m, s)]
    aggregated, all_seeds = aggregate_on_common_seeds(cells, methods, exp.seeds)
    every_seed = every_seed_view(aggregated, all_seeds)
    accuracy = {}
    if exp.task:
        common = {m: {s: c for s, c in by_seed.items() if s in exp.seeds} for m, by_seed in cells.items()}
        section = aggregate_accuracy(common, methods, t_interval)
        for name, entry in section["methods"].items():
            aggregated.setdefault(name, {}).update(entry)
        teacher = read_teacher_accuracy(exp)
        accuracy = {
            "task": exp.task,
            "teacher_accuracy": None if teacher is None else teacher["greedy_accuracy"],
            "teacher_accuracy_sampled": None if teacher is None else teacher["sampled_accuracy"],
            "teacher": teacher,
            "student_start_accuracy": section["student_start_accuracy"]["mean"],
            "reference": section["reference"],
            "accuracy": section,
        }
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
        "not_run": errors,
        "pending_cells": pending,
    }


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _interval(entry: dict[str, Any], digits: int = 3) -> str:
    if entry.get("mean") is None:
        return "—"
    if entry.get("low") is None:
        return f"{entry['mean']:.{digits}f} (n=1)"
    return f"{entry['mean']:.{digits}f} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"


FIXED_TEXT_TABLES = (
    ("eval_fixed_text_kl", "Reverse KL(student ‖ teacher) on the teacher's fixed greedy text"),
    ("eval_fixed_text_forward_kl", "Forward KL(teacher ‖ student) on the teacher's fixed greedy text (coverage)"),
)


def markdown_report(report: dict[str, Any]) -> str:
    """``results.md``: a summary table per method, held-out KL per eval step, per-seed shares, what did not run."""
    methods = report["methods"]
    lines = [f"# Quality benchmark: {report['experiment']}", ""]
    if report.get("accuracy"):
        lines += ["## Task accuracy", "", *accuracy_markdown(report), "## Held-out reverse KL", ""]
    lines.append(
        f"Base config `{report['base_config']}`, seeds {report['seeds']}; common overrides "
        f"`{report['overrides']}`. Share = share of full OPD's post-lock gain in held-out reverse KL (mean, 95% "
        "t-interval over seeds); KL in nats/token."
    )
    lines += ["", "| method | seeds | final held-out KL | final fixed-text KL | share of full gain | "
              "trainable params | optimizer state | wall s / cell |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, m in methods.items():
        fixed = m.get("final_fixed_text_kl", {})
        opt = m["optimizer_state_bytes"]
        lines.append(
            f"| {name} | {len(m['seeds'])} | {_interval(m['final_reverse_kl'])} | {_interval(fixed)} | "
            f"{_interval(m['share_of_full_gain'])} | {m['trainable_params']:,} | "
            f"{opt / 2**20:.1f} MiB | {m['wall_s']['mean']:.0f} |"
        )
    for name in report["not_run"]:
        lines.append(f"| {name} | not run | | | | | | |")
    wider = report.get("all_seeds") or {}
    if wider:
        lines += [
            "",
            "## With their extra seeds",
            "",
            f"The table above compares every method on the common seeds {report['seeds']}; these methods also "
            "ran extra seeds (`extra_seeds`), each share against the same seed's full run:",
            "",
            "| method | seeds | final held-out KL | final fixed-text KL | share of full gain |",
            "|---|---|---|---|---|",
        ]
        for name, m in wider.items():
            lines.append(
                f"| {name} | {', '.join(map(str, m['seeds']))} | {_interval(m['final_reverse_kl'])} | "
                f"{_interval(m.get('final_fixed_text_kl', {}))} | {_interval(m['share_of_full_gain'])} |"
            )  # fmt: skip
    steps = sorted({int(s) for m in methods.values() for s in m["eval_reverse_kl"]})
    if steps:
        lines += ["", "## Held-out reverse KL per eval step (mean ± std over seeds)", ""]
        lines += ["| method | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---|" * len(steps)]
        for name, m in methods.items():
            cells = []
            for s in steps:
                e = m["eval_reverse_kl"].get(str(s))
                cells.append("" if e is None else f"{e['mean']:.3f}" + (f" ± {e['std']:.3f}" if e["std"] else ""))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for key, title in FIXED_TEXT_TABLES:
        fixed_steps = sorted({int(s) for m in methods.values() for s in m.get(key, {})})
        if not fixed_steps:
            continue
        lines += ["", f"## {title} per eval step (mean over seeds)", ""]
        lines += ["| method | " + " | ".join(str(s) for s in fixed_steps) + " |", "|---|" + "---|" * len(fixed_steps)]
        for name, m in methods.items():
            row = [m.get(key, {}).get(str(s)) for s in fixed_steps]
            lines.append(f"| {name} | " + " | ".join("" if e is None else f"{e['mean']:.3f}" for e in row) + " |")
    every_seed = every_seed_view(methods, wider)
    monitored = {name: m["monitor"] for name, m in every_seed.items() if m.get("monitor")}
    if monitored:
        title = "## What the trajectory monitor said (mean over every seed a method ran) against the measured share"
        lines += ["", title, ""]
        header = "| method | captured gradient energy | random subspace | cosine to full AdamW step | "
        header += "same-batch estimate | measured share | next-batch estimate (its seeds) | "
        header += "measured share, those seeds | "
        lines += [header + "flagged |", "|---|---|---|---|---|---|---|---|---|"]
        for name, mon in monitored.items():
            next_seeds = mon.get("estimate_seeds", {}).get("next_batch_progress_share") or []
            next_batch = mon.get("next_batch_progress_share")
            shown = "" if next_batch is None else f"{next_batch:.3f} ({', '.join(map(str, next_seeds))})"
            on_those = _measured_share(every_seed[name], next_seeds) if next_seeds else None
            lines.append(
                f"| {name} | {_fmt(mon['captured_energy_mean'], 3)} | {_fmt(mon['random_baseline'], 3)} | "
                f"{_fmt(mon['cosine_to_adam_mean'], 3)} | {_fmt(mon['predicted_progress_share'], 3)} | "
                f"{_interval(every_seed[name]['share_of_full_gain'])} | {shown} | {_fmt(on_those, 3)} | "
                f"{'yes' if mon['flagged'] else 'no'} |"
            )
        for key, what in (("monitor_ranking", "same-batch"), ("monitor_ranking_next_batch", "next-batch")):
            ranking = report.get(key)
            if ranking:
                lines += ["", f"Kendall's tau between the {what} estimate and the measured shares (of the seeds the "
                          f"estimate has): {ranking['kendall_tau']:.2f} (estimated order "
                          f"{', '.join(ranking['by_predicted_share'])}; measured "
                          f"{', '.join(ranking['by_measured_share'])})."]  # fmt: skip
        by_run = report.get("monitor_ranking_by_run") or {}
        if by_run.get("cells"):
            lines += [
                "",
                "Run by run, on the runs that have the next-batch estimate:",
                "",
                "| run | same-batch estimate | next-batch estimate | measured share |",
                "|---|---|---|---|",
            ]
            for cell, v in sorted(by_run["cells"].items(), key=lambda kv: -kv[1]["measured"]):
                lines.append(
                    f"| {cell} | {v['predicted_progress_share']:.3f} | {v['next_batch_progress_share']:.3f} | "
                    f"{v['measured']:.3f} |"
                )
            if "next_batch_progress_share" in by_run:
                lines += [
                    "",
                    f"Kendall's tau over these {len(by_run['cells'])} runs: same-batch "
                    f"{by_run['predicted_progress_share']:.2f}, next-batch {by_run['next_batch_progress_share']:.2f}.",
                ]
    selection = report.get("lr_selection")
    if selection:
        lines += ["", "## Learning-rate selection", "", f"Rule: {selection['rule']}.", ""]
        by_accuracy = selection["rule"] == ACCURACY_LR_RULE
        columns = ("accuracy", "accuracy_sampled") if by_accuracy else ("final_reverse_kl", "final_fixed_text_kl")
        heads = "final accuracy (greedy) | final mean@k" if by_accuracy else "final held-out KL | final fixed-text KL"
        lines += [f"| family | candidate | {heads} | selected |", "|---|---|---|---|---|"]
        for family, screen in selection["families"].items():
            for name, c in screen["candidates"].items():
                mark = "**yes**" if name == screen["selected"] else ""
                if c is None:
                    lines.append(f"| {family} | {name} | not run | | |")
                else:
                    first, second = _fmt(c[columns[0]], 3), _fmt(c[columns[1]], 3)
                    lines.append(f"| {family} | {name} | {first} | {second} | {mark} |")
            if not screen["complete"]:
                lines.append(f"| {family} | (incomplete: the choice may change) | | | |")
    lines += ["", "## Per seed", "", "| method | seed | lock step | final held-out KL | share of full gain | wall s |"]
    lines.append("|---|---|---|---|---|---|")
    for name, m in every_seed.items():
        for s in m["seeds"]:
            key = str(s)
            lines.append(
                f"| {name} | {s} | {_fmt(m['lock_step'][key])} | {_fmt(m['final_reverse_kl']['per_seed'][key])} | "
                f"{_fmt(m['share_of_full_gain']['per_seed'].get(key), 3)} | {_fmt(m['per_seed_wall_s'][key], 0)} |"
            )
    if report["not_run"]:
        lines += ["", "## Not run", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in report["not_run"].items()]
    if report["pending_cells"]:
        lines += ["", f"Pending cells: {', '.join(report['pending_cells'])}."]
    return "\n".join(lines) + "\n"


README_BEGIN = "<!-- quality-table: generated from "
README_END = "<!-- /quality-table -->"


def readme_table(report: dict[str, Any], steps: list[int] | None = None) -> str:
    """A compact markdown table for a README: held-out KL at chosen eval steps, shares per seed, memory, time."""
    methods = report["methods"]
    all_steps = sorted({int(s) for m in methods.values() for s in m["eval_reverse_kl"]})
    steps = [s for s in (steps or all_steps) if s in all_steps]
    head = ["method", "seeds"] + [f"KL @{s}" for s in steps]
    head += ["fixed-text KL @0 → end", "share of full gain per seed", "share mean [95% CI]", "optimizer state",
             "wall min / cell"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        kl = [m["eval_reverse_kl"].get(str(s)) for s in steps]
        fixed = m.get("eval_fixed_text_kl", {})
        fixed_steps = sorted(int(s) for s in fixed)
        fixed_text = (
            f"{fixed[str(fixed_steps[0])]['mean']:.2f} → {fixed[str(fixed_steps[-1])]['mean']:.2f}"
            if fixed_steps
            else ""
        )
        shares = m["share_of_full_gain"]["per_seed"]
        row = [name, ",".join(map(str, m["seeds"]))]
        row += ["" if e is None else f"{e['mean']:.3f}" + (f" ± {e['std']:.3f}" if e["std"] else "") for e in kl]
        row += [fixed_text, ", ".join(f"{v:.3f}" for v in shares.values()), _interval(m["share_of_full_gain"])]
        row += [f"{m['optimizer_state_bytes'] / 2**20:.1f} MiB", f"{m['wall_s']['mean'] / 60:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    for name in report["not_run"]:
        lines.append(f"| {name} | not run |" + " |" * (len(head) - 2))
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
    text = text[:begin] + header + readme_table(report, [0, 4, 8, 12, 16, 20, 24, 28, 30]) + "\n" + text[end:]
    readme.write_text(text)


def plot_quality(report: dict[str, Any], path: Path) -> Path | None:
    """``quality.png``: held-out reverse KL (and fixed-text KL) vs step, mean with a min..max band per method."""
    methods = report["methods"]
    if not methods:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['experiment']}: mean over training seeds, band = min..max", fontsize=10)
    return save_figure(fig, path)


def write_reports(exp: Experiment, errors: dict[str, str] | None = None) -> dict[str, Any]:
    """Rewrite ``results.json``, ``results.md`` and ``quality.png`` from the finished cells."""
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
    return report


def read_teacher_accuracy(exp: Experiment) -> dict[str, Any] | None:
    """The teacher's accuracy (``OUT/teacher_accuracy.json``), or None before it was measured."""
    path = exp.out_dir / "teacher_accuracy.json"
    return json.loads(path.read_text()) if path.is_file() else None


def measure_teacher_accuracy(exp: Experiment) -> dict[str, Any] | None:
    """Score ``exp.teacher_model`` once with the cells' accuracy settings (problems, samples, seed of seed 0's cells)
    and cache it in ``OUT/teacher_accuracy.json``."""
    if not (exp.task and exp.teacher_model):
        return None
    cached = read_teacher_accuracy(exp)
    if cached is not None:
        return cached
    from lockedopd.opd.accuracy import evaluate_accuracy
    from lockedopd.opd.builders import build_accuracy_problems, build_model
    from lockedopd.opd.config import ModelConfig
    from lockedopd.opd.rollout import encode_prompts
    from lockedopd.opd.seeds import ACCURACY_SEED_OFFSET, step_seed
    from lockedopd.runtime.checkpoint import atomic_write_text
    from lockedopd.tasks.rewards import resolve_reward_fn

    config = cell_config(exp, REFERENCE if REFERENCE in exp.methods else next(iter(exp.methods)), exp.seeds[0])
    acc = config.accuracy
    if exp.threads:  # as a cell runs: on shared cores a second thread stalls at every OpenMP barrier
        import torch

        torch.set_num_threads(exp.threads)
    problems = build_accuracy_problems(config)
    model, tokenizer = build_model(ModelConfig(source=exp.teacher_model))
    ids = encode_prompts(tokenizer, [p.prompt for p in problems], config.data.use_chat_template,
                         config.rollout.max_prompt_tokens)  # fmt: skip
    started = time.time()
    result = evaluate_accuracy(
        model, tokenizer, ids, [p.answer for p in problems], resolve_reward_fn(acc.verifier),
        acc.max_new_tokens or config.rollout.max_new_tokens, batch_size=acc.batch_size, samples=acc.samples,
        temperature=acc.temperature, seed=step_seed(config.seed + ACCURACY_SEED_OFFSET, 0),
    )  # fmt: skip
    record = {
        "model": exp.teacher_model,
        "greedy_accuracy": result.greedy,
        "sampled_accuracy": result.sampled,
        "samples": result.samples,
        "problems": result.problems,
        "seconds": round(time.time() - started, 1),
    }
    exp.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(exp.out_dir / "teacher_accuracy.json", json.dumps(record, indent=2))
    return record


def _refresh_reports(exp: Experiment, experiment_path: Path | None, errors: dict[str, str]) -> None:
    """Rewrite the reports after a cell; a reporting error is printed, never allowed to stop the grid.

    With ``isolation=process`` a fresh interpreter renders them (``--rerender``), so improvements to the reporting
    code take effect in a long grid without restarting it.
    """
    try:
        if exp.isolation == "process" and experiment_path is not None:
            cmd = [sys.executable, str(Path(__file__).resolve()), str(experiment_path), "--out", str(exp.out_dir)]
            proc = subprocess.run([*cmd, "--rerender", "--quiet"], cwd=REPO)
            if proc.returncode != 0:
                print(f"[quality] warning: rendering the reports failed (exit {proc.returncode})", flush=True)
        else:
            write_reports(exp, errors)
    except Exception as exc:  # the cells are what matters; the reports can be rerendered later
        print(f"[quality] warning: rendering the reports failed: {type(exc).__name__}: {exc}", flush=True)


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
    computed, skipped = [], []
    measure_teacher_accuracy(exp)
    for method, seed in exp.cells():
        if (methods and method not in methods) or (seeds is not None and seed not in seeds) or method in errors:
            continue
        if is_finished(exp, method, seed):
            skipped.append((method, seed))
            _cleanup(exp.cell_dir(method, seed))
            continue
        if max_cells is not None and len(computed) >= max_cells:
            break
        print(f"[quality] cell {method}/seed{seed} ...", flush=True)
        if exp.isolation == "process":
            if experiment_path is None:
                raise ValueError("isolation=process needs the experiment's path; pass experiment_path.")
            _run_cell_in_process(exp, experiment_path, method, seed)
        else:
            run_cell(exp, method, seed)
        computed.append((method, seed))
        _refresh_reports(exp, experiment_path, errors)
        print(f"[quality] cell {method}/seed{seed} finished; reports in {exp.out_dir}", flush=True)
    report = write_reports(exp, errors)
    return {"computed": computed, "skipped": skipped, "report": report}


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help="experiment YAML (benchmarks/experiments/quality_*.yaml)")
    p.add_argument("--out", default=None, help="output directory (default: the experiment's `out`)")
    p.add_argument("--methods", default=None, help="comma list: run only these methods")
    p.add_argument("--seeds", default=None, help="comma list: run only these seeds")
    p.add_argument("--max-cells", type=int, default=None, help="stop after computing this many cells")
    p.add_argument("--rerender", action="store_true", help="only rewrite the reports from the finished cells")
    p.add_argument("--quiet", action="store_true", help="do not print results.md")
    p.add_argument("--readme", default=None, help="also rewrite this README's quality-table block from results.json")
    p.add_argument("--cell", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)  # one cell, internal
    args = p.parse_args(argv)
    exp = load_experiment(args.experiment, args.out)
    if args.cell:
        run_cell(exp, args.cell[0], int(args.cell[1]))
        return 0
    if args.rerender:
        report = write_reports(exp)
    else:
        methods = args.methods.split(",") if args.methods else None
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        report = run(exp, Path(args.experiment), methods, seeds, args.max_cells)["report"]
    if args.readme:
        results = exp.out_dir / "results.json"
        shown = results.relative_to(REPO) if results.is_relative_to(REPO) else results
        update_readme(report, Path(args.readme), str(shown))
    if not args.quiet:
        print(markdown_report(report))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
