"""benchmarks/loop_vs_trl.py without running it: its lockedopd runs are valid configs of the same work, and the
report's ratios compare each lockedopd run with TRL's run of the same phase."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lockedopd.opd import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("loop_vs_trl", REPO / "benchmarks" / "loop_vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "run", ["lockedopd_full", "lockedopd_locked", "lockedopd_full_chunked", "lockedopd_locked_chunked"]
)
def test_lockedopd_runs_are_valid_configs_of_the_shared_work(bench, run, tmp_path):
    config = load_config(bench.RECIPE, bench._lockedopd_overrides(run, tmp_path, steps=6, eval_steps=3))
    work = bench.WORK
    assert (config.batch_size, config.rollout.max_new_tokens, config.lr) == (8, 48, 3e-6) == (
        work["batch_size"], work["max_new_tokens"], work["lr"])  # fmt: skip
    assert config.teacher.backend == "hf" and not config.monitor.enabled and not config.eval_fixed_text
    assert config.objective.chunk_size == (64 if run.endswith("_chunked") else 0)
    if "_locked" in run:
        assert config.lock.enabled and config.lock.at_step == 0 and config.lock.basis_source == "random"
        assert config.lock.rank == 16 and config.lock.optimizer == "factored"
    else:
        assert not config.lock.enabled


def test_ratios_compare_each_lockedopd_run_with_trls_run_of_the_same_phase(bench):
    gib = 2**30
    rows = {
        "trl_full": {"peak_rss_bytes": 4 * gib},
        "trl_locked": {"peak_rss_bytes": 2 * gib},
        "lockedopd_full": {"peak_rss_bytes": 5 * gib},
        "lockedopd_locked_chunked": {"peak_rss_bytes": 1 * gib},
    }
    assert bench.ratios_to_trl(rows) == {"lockedopd_full": 1.25, "lockedopd_locked_chunked": 0.5}
    del rows["trl_locked"]
    assert bench.ratios_to_trl(rows) == {"lockedopd_full": 1.25}
