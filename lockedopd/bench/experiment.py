"""A quality grid's experiment: the YAML it is read from, its cells in run order, and each cell's config.

An experiment YAML names a base config (a recipe), overrides common to every cell, the methods (name -> config
overrides, e.g. ``full: {lock.enabled: false}``), the training seeds and the output directory (see
``benchmarks/experiments/quality_tiny.yaml``). Cell ``(method, seed)`` trains the base config with the common
overrides, the method's overrides and ``seed=<seed>`` into ``OUT/cells/<method>/seed<seed>/``.

Relative paths in an experiment (``base_config``, ``out``, data paths) are read from its *root*: the current
directory when the base config is found there, else the nearest folder above the experiment file where it is (for
the committed experiments: the repository root, from wherever they are run). Cells train with the root as their
working directory, so the recipes' own relative paths resolve there too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lockedopd.bench.targets import Target, parse_targets

REFERENCE = "full"
ORDERS = ("method_major", "seed_major")
ISOLATIONS = ("process", "inline")
NOT_YAML_KEYS = ("root",)  # set by load_experiment, never by the YAML


@dataclass
class Experiment:
    """A quality grid.

    Attributes:
        name: experiment name (the YAML's stem unless given).
        base_config: the recipe every cell starts from (relative to :attr:`root`, or absolute).
        overrides: dotted-key overrides applied to every cell (e.g. ``eval_steps: 4``).
        methods: method name -> its dotted-key overrides, in run order. ``full`` (the reference) is required for
            the share of full OPD's gain.
        seeds: training seeds (``seed=<s>`` per cell).
        out: output directory (relative to :attr:`root`, or absolute).
        order: ``method_major`` (all seeds of one method, then the next) or ``seed_major``.
        isolation: ``process`` (each cell in a fresh interpreter: frees the teacher engine and memory between
            cells) or ``inline`` (in this process: tests, tiny models).
        threads: torch threads per cell (``null`` = torch's default).
        fixed_text_cache: share the teacher's fixed-text completions between cells in ``OUT/fixed_text/`` (when
            the config sets ``eval_fixed_text``).
        lr_screens: learning-rate screens: a family name -> the methods that differ only in learning rate. The
            report picks each family's lr (lowest final KL on the teacher's fixed text, or best accuracy on a task).
        extra_seeds: method -> seeds it runs beyond ``seeds`` (where a method's interval is too wide to tell a
            target). Its share on such a seed needs the same seed's ``full`` run, so ``full`` must list them too.
        task: the verifiable task the cells measure accuracy on (their config's ``accuracy`` section); accuracy then
            leads the report, and only the first method's cells evaluate the step-0 student.
        teacher_model: the teacher's model source (e.g. ``built:RECIPE.yaml``), scored once with the cells' accuracy
            settings into ``OUT/teacher_accuracy.json``.
        geometry: measure each finished cell's update geometry from its checkpoints before they are deleted
            (:mod:`lockedopd.bench.geometry`: stable rank, ‖ΔW‖_F, Hill α̂ and top-16 similarity to the final update
            per checkpoint, the paper's Table-1 metrics at the end) into the cell's ``geometry.json``.
        report: ``"quality"`` (the grid's report) or ``"paper"`` (also the paper's findings:
            :mod:`lockedopd.bench.paper_findings` names the cells it reads; needs ``geometry: true``).
        targets: the claims the grid tests, checked on every report (:mod:`lockedopd.bench.targets`: e.g.
            ``{method: locked_right, share_at_least: 0.98}``); needs ``task``.
        root: the folder relative paths are read from (set by :func:`load_experiment`; None = the current one).
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
    geometry: bool = False
    report: str = "quality"
    targets: list[dict[str, Any]] = field(default_factory=list)
    root: str | None = None

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("experiment: methods is empty; name at least `full` and one method to compare.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"experiment: seeds must be a non-empty list of distinct integers, got {self.seeds}.")
        if self.order not in ORDERS:
            raise ValueError(f"experiment: order={self.order!r} is not one of {list(ORDERS)}.")
        if self.report not in ("quality", "paper"):
            raise ValueError(f"experiment: report={self.report!r} is not one of ['quality', 'paper'].")
        if self.report == "paper" and not self.geometry:
            raise ValueError("experiment: report=paper reads each cell's update geometry; set geometry: true.")
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"experiment: isolation={self.isolation!r} is not one of {list(ISOLATIONS)}.")
        for family, members in self.lr_screens.items():
            if not isinstance(members, list) or not members or any(m not in self.methods for m in members):
                raise ValueError(
                    f"experiment: lr_screens.{family} must list methods of this experiment, got {members!r}; "
                    f"methods: {list(self.methods)}."
                )
        for method, extra in self.extra_seeds.items():
            self._check_extra_seeds(method, extra)
        if self.targets and not self.task:
            raise ValueError("experiment: targets are checked on task accuracy; set task (e.g. column_addition).")
        parse_targets(self.targets, list(self.methods))
        for name, overrides in self.methods.items():
            if not isinstance(overrides, dict):
                raise ValueError(
                    f"experiment: method {name!r} must map dotted config keys to values (e.g. lock.enabled: false), "
                    f"got {overrides!r}; use {{}} for the base config unchanged."
                )

    def _check_extra_seeds(self, method: str, extra: Any) -> None:
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

    @property
    def root_dir(self) -> Path:
        """The folder relative paths are read from, absolute."""
        return Path(self.root).resolve() if self.root else Path.cwd()

    def path(self, path: str | Path) -> Path:
        """A path of the experiment, absolute: as is when absolute, else under :attr:`root_dir`."""
        path = Path(path)
        return path if path.is_absolute() else self.root_dir / path

    @property
    def out_dir(self) -> Path:
        """The output directory, absolute."""
        return self.path(self.out)

    def parsed_targets(self) -> list[Target]:
        """:attr:`targets` as :class:`~lockedopd.bench.targets.Target` objects."""
        return parse_targets(self.targets, list(self.methods))

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


def find_root(path: str | Path, experiment_file: str | Path) -> Path:
    """The folder a relative ``path`` of an experiment is read from: the current directory if ``path`` exists there
    (or is absolute), else the nearest folder above ``experiment_file`` where it exists, else the current one."""
    path, cwd = Path(path), Path.cwd()
    if path.is_absolute() or (cwd / path).exists():
        return cwd
    for folder in Path(experiment_file).resolve().parents:
        if (folder / path).exists():
            return folder
    return cwd


def load_experiment(path: str | Path, out: str | None = None) -> Experiment:
    """Read an experiment YAML; unknown keys raise ``ValueError`` naming the allowed ones."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment {path} does not exist; see benchmarks/experiments/quality_*.yaml.")
    data = yaml.safe_load(path.read_text()) or {}
    allowed = set(Experiment.__dataclass_fields__) - set(NOT_YAML_KEYS)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"experiment {path}: unknown key {unknown[0]!r}; allowed: {sorted(allowed)}.")
    missing = [k for k in ("base_config", "methods", "seeds") if k not in data]
    if missing:
        raise ValueError(f"experiment {path}: missing {missing[0]!r} (needs base_config, methods, seeds).")
    data.setdefault("name", path.stem)
    data.setdefault("out", f"benchmarks/results/{data['name']}")
    if out is not None:
        data["out"] = str(Path(out).resolve())
    data["methods"] = {name: dict(overrides or {}) for name, overrides in data["methods"].items()}
    data["root"] = str(find_root(data["base_config"], path))
    return Experiment(**data)


@contextmanager
def in_root(exp: Experiment) -> Iterator[Path]:
    """Run the enclosed code with the experiment's root as the working directory (the recipes' relative paths)."""
    previous = Path.cwd()
    os.chdir(exp.root_dir)
    try:
        yield exp.root_dir
    finally:
        os.chdir(previous)


def override_list(mapping: dict[str, Any]) -> list[str]:
    """``{"lock.enabled": False}`` -> ``["lock.enabled=false"]`` (JSON values, which the YAML parser reads back)."""
    return [f"{key}={json.dumps(value)}" for key, value in mapping.items()]


def cell_overrides(exp: Experiment, method: str, seed: int) -> list[str]:
    """The config overrides of one cell: common ones, the method's, then seed, output_dir and resume."""
    overrides = override_list(exp.overrides) + override_list(exp.methods[method])
    overrides += [f"seed={seed}", f"output_dir={exp.cell_dir(method, seed)}", "resume=true"]
    if exp.task and method != next(iter(exp.methods)) and not has_own_student(exp, method):
        overrides.append("eval_at_start=false")  # the seed's step-0 student: only the first method evaluates it
    if exp.fixed_text_cache:
        overrides.append(f"eval_fixed_text_path={exp.out_dir / 'fixed_text'}")
    return overrides


def has_own_student(exp: Experiment, method: str) -> bool:
    """Whether ``method`` starts from another student than the experiment's first method (its ``student.*``
    overrides differ, e.g. an RL arm from an SFT anchor): it then evaluates its own step-0 accuracy, and its gain
    is measured from there, not from the seed's shared step-0 student."""

    def student(name: str) -> dict[str, Any]:
        """The ``student.*`` overrides of method ``name``."""
        return {key: value for key, value in exp.methods[name].items() if key.startswith("student.")}

    return student(method) != student(next(iter(exp.methods)))


def cell_config(exp: Experiment, method: str, seed: int) -> Any:
    """The :class:`~lockedopd.opd.OPDConfig` of one cell (raises ``ValueError`` when the method cannot run)."""
    from lockedopd.opd import load_config

    return load_config(exp.path(exp.base_config), cell_overrides(exp, method, seed))


def method_errors(exp: Experiment) -> dict[str, str]:
    """Methods whose config the trainer rejects (e.g. a method it cannot run yet), with the reason."""
    errors = {}
    for method in exp.methods:
        try:
            cell_config(exp, method, exp.seeds[0])
        except (ValueError, TypeError) as exc:
            errors[method] = str(exc).splitlines()[0]
    return errors
