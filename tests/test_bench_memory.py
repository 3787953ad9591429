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


def test_device_cuda_is_refused_before_anything_runs_where_it_cannot_work(tmp_path, monkeypatch):
    experiment = tmp_path / "gpu.yaml"
    experiment.write_text("device: cuda\nisolation: spawn\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device=cuda, but torch sees no CUDA GPU.*set device: cpu"):
        load_config(experiment)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_config(experiment)["device"] == "cuda"
    experiment.write_text("device: cuda\nisolation: fork\n")
    with pytest.raises(ValueError, match="isolation=fork.*set\\s+isolation: spawn"):
        load_config(experiment)
    experiment.write_text("device: tpu\n")
    with pytest.raises(ValueError, match="device='tpu' is invalid; allowed: \\['cpu', 'cuda'\\]"):
        load_config(experiment)


def test_the_gpu_experiment_is_valid_where_a_gpu_is(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = load_config(BENCH / "experiments" / "gpu_1_7b.yaml")
    assert config["device"] == "cuda" and config["isolation"] == "spawn"
    assert "full" in config["methods"] and "inference" in config["methods"]


def test_a_gpu_report_adds_the_allocator_peak_columns_and_ratios(tmp_path):
    """A run on a CUDA student (records with the allocator's peak) gets GPU columns in the absolute table, in the
    ratios to full OPD and to inference, a sentence naming the GPU, and a GPU bar in the plot; a CPU report none."""
    from lockedopd.bench.memory.plot import plot_memory
    from lockedopd.bench.memory.report import add_ratios

    cpu_report = json.loads((BENCH / "results" / "smollm2" / "results.json").read_text())
    assert "GPU peak" not in markdown_report(cpu_report)
    report = json.loads(json.dumps(cpu_report))
    peaks = {"full": 30 * 2**30, "locked_right": 9 * 2**30, "inference": 8 * 2**30}
    report["results"] = {m: report["results"][m] for m in peaks}
    for method, record in report["results"].items():
        record.pop("ratios_to_full", None), record.pop("ratios_to_inference", None)
        record["cuda_peak_bytes"], record["cuda_peak_delta_bytes"] = peaks[method], peaks[method] - 7 * 2**30
        record["device_name"] = "NVIDIA H200"
    add_ratios(report["results"])
    locked = report["results"]["locked_right"]
    assert locked["ratios_to_full"]["cuda_peak_bytes"] == pytest.approx(9 / 30)
    assert locked["ratios_to_full"]["cuda_peak_delta_bytes"] == pytest.approx(2 / 23)
    assert locked["ratios_to_inference"]["cuda_peak_delta_bytes"] == pytest.approx(2 / 1)
    text = markdown_report(report)
    assert "The student trains on the GPU (NVIDIA H200)" in text and "GPU peak Δ MiB | GPU peak MiB |" in text
    full_row = next(line for line in text.splitlines() if line.startswith("| full OPD (AdamW) |"))
    assert full_row.endswith("| 23,552.00 | 30,720.00 |")
    locked_ratio_row = [line for line in text.splitlines() if line.startswith(f"| {locked['label']} |")][1]
    assert locked_ratio_row.endswith("| 0.087 | 0.300 |")
    plot_memory(report, tmp_path / "memory.png")
    assert (tmp_path / "memory.png").stat().st_size > 10_000


def test_a_failing_method_stops_the_run_or_is_recorded_and_the_outputs_keep_what_was_measured(tmp_path, monkeypatch):
    """After each method the outputs are rewritten (a run stopped part-way keeps its measurements); a failing method
    raises, or with keep_going is listed under `failed` with its error while the others are measured."""
    from lockedopd.bench.memory import run, workers

    config = load_config(TINY, ["inference", "locked_right", "full"])
    config.update(isolation="none", steps={"warmup": 1, "timed": 1})
    measured = workers.measure_method

    def failing_locked(method, cfg):
        if method == "locked_right":
            raise RuntimeError("CUDA out of memory (simulated)")
        return measured(method, cfg)

    monkeypatch.setattr(workers, "measure_method", failing_locked)
    with pytest.raises(RuntimeError, match="(?s)'locked_right' failed.*CUDA out of memory"):
        run(config, tmp_path / "stop", progress=False)
    partial = json.loads((tmp_path / "stop" / "results.json").read_text())
    assert list(partial["results"]) == ["inference"] and "failed" not in partial
    assert "Not measured (the run stopped before them): `locked_right`, `full`." in markdown_report(partial)

    report = run(config, tmp_path / "go", progress=False, keep_going=True)
    assert list(report["results"]) == ["inference", "full"]
    assert report["failed"] == {"locked_right": "RuntimeError: CUDA out of memory (simulated)"}
    assert report["results"]["full"]["ratios_to_inference"]["peak_live_bytes"] > 1
    text = (tmp_path / "go" / "results.md").read_text()
    assert "Failed `locked_right`: RuntimeError: CUDA out of memory (simulated)" in text
