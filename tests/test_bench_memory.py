"""lockedopd.bench.memory: methods built from the registries, the committed report re-rendered, the modules' size.

Everything here runs in this process (no worker processes; the end-to-end run is tests/test_benchmarks.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lockedopd.bench.memory import load_config, markdown_report, measure_method, method_spec, setup_method
from lockedopd.bench.memory.accounting import optimizer_breakdown
from lockedopd.bench.memory.student import build_student
from lockedopd.bench.tables import markdown_table
from lockedopd.lock.methods import LOCK_METHODS
from lockedopd.lock.params import select_target_linears
from lockedopd.lock.phases import LockedPhase
from lockedopd.optim.full import FULL_OPTIMIZERS, FullOptimizer

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
TINY = BENCH / "experiments" / "tiny.yaml"
PACKAGE = REPO / "lockedopd" / "bench" / "memory"


class FakeSGD(torch.optim.SGD):
    """A stand-in baseline: SGD with momentum (one momentum buffer per weight, no Adam state)."""


def _fake_sgd(config, params):
    return FakeSGD(params, lr=config.lr, momentum=0.9)


class FakeLockMethod:
    """A stand-in lock method: SGD on the full target weights; records the request it got."""

    needs_basis = True
    frozen_base = False

    def __init__(self) -> None:
        self.requests = []

    def enter(self, request):
        self.requests.append(request)
        weights = [request.model.get_submodule(name).weight for name in request.target_names]
        return LockedPhase(request.model, FakeSGD(weights, lr=request.lr), request.bases, kind="projected_full"), None

    def resume(self, request):  # pragma: no cover - the benchmark never resumes
        raise NotImplementedError


@pytest.fixture()
def tiny_config():
    config = load_config(TINY)
    config["steps"] = {"warmup": 1, "timed": 1}
    return config


def _target_shapes(config):
    model = build_student(config)
    return [tuple(m.weight.shape) for m in select_target_linears(model, config["target_modules"]).values()]


def _setup(method, config, tmp_path):
    return setup_method(method, build_student(config), config, tmp_path)


def test_a_registered_full_optimizer_is_a_measurable_method(tiny_config):
    FULL_OPTIMIZERS.register("fake_sgd", FullOptimizer(_fake_sgd, "test stand-in"))
    try:
        assert load_config(TINY, ["full", "full_fake_sgd"])["methods"] == ["full", "full_fake_sgd"]
        record = measure_method("full_fake_sgd", tiny_config)
    finally:
        del FULL_OPTIMIZERS["fake_sgd"]
    weights = sum(o * i for o, i in _target_shapes(tiny_config))
    assert record["options"]["optimizer"] == "FakeSGD"
    assert record["trainable_params"] == weights and record["grad_bytes"] == 4 * weights
    assert record["other_state_bytes"] == 4 * weights and record["moment_bytes"] == 0  # one momentum buffer each
    assert record["losses"][-1] != record["losses"][0]
    with pytest.raises(ValueError, match="full_fake_sgd"):  # gone from the registry, gone from the benchmark
        load_config(TINY, ["full_fake_sgd"])


@pytest.mark.parametrize(("method", "entry"), [("full", "adamw"), ("galore", "galore"), ("full_factored", "factored")])
def test_full_methods_build_the_registry_entry(method, entry, tiny_config, tmp_path, monkeypatch):
    built = []

    def build(config, params):
        built.append((config.optimizer, config.lr, config.galore.rank))
        return _fake_sgd(config, params)

    monkeypatch.setitem(FULL_OPTIMIZERS, entry, FullOptimizer(build, "test stand-in"))
    setup = _setup(method, tiny_config, tmp_path)
    assert isinstance(setup.optimizer, FakeSGD)
    assert built == [(entry, tiny_config["lr"], tiny_config["rank"])]


@pytest.mark.parametrize(("method", "entry", "mode"), [("lora", "lora", "right"), ("lock_projected_full",
                         "projected_full", "right"), ("locked_two_sided", "subspace", "two_sided")])  # fmt: skip
def test_lock_methods_enter_through_the_registry(method, entry, mode, tiny_config, tmp_path, monkeypatch):
    fake = FakeLockMethod()
    monkeypatch.setitem(LOCK_METHODS, entry, fake)
    setup = _setup(method, tiny_config, tmp_path)
    assert isinstance(setup.optimizer, FakeSGD)
    (request,) = fake.requests
    assert request.settings.rank == tiny_config["rank"] and request.settings.mode == mode
    assert request.lr == tiny_config["lr"] and len(request.target_names) == len(_target_shapes(tiny_config))
    assert {basis.mode for basis in request.bases.values()} == {mode}
    assert request.warmup_optimizer.state == {}  # a fresh warmup: nothing is carried into the lock


def test_locked_methods_enter_through_the_subspace_entry_and_a_right_lock_holds_no_left_basis(
    tiny_config, tmp_path, monkeypatch
):
    """Every locked method is the registry's ``subspace`` entry; its right-sided phase keeps only V in memory (the
    basis file keeps U): the optimizer holds no basis of its own, the adapter holds V alone."""
    fake = FakeLockMethod()
    monkeypatch.setitem(LOCK_METHODS, "subspace", fake)
    _setup("locked_right_adamw", tiny_config, tmp_path / "a")
    assert len(fake.requests) == 1
    monkeypatch.undo()
    r, shapes = tiny_config["rank"], _target_shapes(tiny_config)
    right = _setup("locked_right", tiny_config, tmp_path / "b")
    assert type(right.optimizer).__name__ == "FactoredSubspaceAdamW"
    assert optimizer_breakdown(right.optimizer, right.model)["optimizer_basis_bytes"] == 0
    assert all(basis.U is None for basis in right.optimizer.bases.values())
    two_sided = _setup("locked_two_sided", tiny_config, tmp_path / "c")
    assert sum(b.U.numel() for b in two_sided.optimizer.bases.values()) == sum(o * r for o, _ in shapes)


def test_unknown_methods_name_the_registries():
    assert method_spec("lock_lora").entry == "lora" and method_spec("full_adamw8bit").entry == "adamw8bit"
    for name in ("full_sgd", "lock_nothing", "adafactor"):
        with pytest.raises(ValueError, match="full_<one of .*'adamw'.*lock_<one of .*'subspace'"):
            method_spec(name)


def test_markdown_table():
    table = markdown_table(["method", "bytes", "s"], [["a", "1", "2"], ["b", "3", "4"]], numbers_right=True)
    assert table == ["| method | bytes | s |", "|---|---:|---:|", "| a | 1 | 2 |", "| b | 3 | 4 |"]


def test_committed_results_render_unchanged():
    """markdown_report of each committed memory/speed results.json is byte-identical to its results.md."""
    committed = [
        d
        for d in sorted((BENCH / "results").iterdir())
        if (d / "results.md").is_file() and (d / "results.md").read_text().startswith("# Memory and speed of OPD")
    ]
    assert committed, "no committed memory/speed results"
    for directory in committed:
        report = json.loads((directory / "results.json").read_text())
        assert markdown_report(report) == (directory / "results.md").read_text(), directory.name


def test_the_script_is_thin_and_the_modules_are_small():
    assert len((BENCH / "memory_speed.py").read_text().splitlines()) <= 300
    sizes = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert len(sizes) >= 5 and max(sizes.values()) <= 300, sizes


def test_full_mmap_is_planned_as_full_opd():
    """The allocator twin of full OPD is planned as full OPD's (warmup) step, not as a locked one."""
    from lockedopd.bench.memory import planned_bytes

    config = load_config(TINY)
    assert planned_bytes(config, "full_mmap") == planned_bytes(config, "full")
    assert planned_bytes(config, "locked_right_mmap") == planned_bytes(config, "locked_right")
    assert planned_bytes(config, "full")["gradients"] > planned_bytes(config, "locked_right")["gradients"]
