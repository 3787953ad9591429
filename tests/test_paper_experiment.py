"""The paper experiment's pieces on tiny models: a locked SFT run's update after the lock lies in the locked span,
and a grid with ``geometry: true`` keeps each cell's trajectory and Table-1 metrics (its checkpoints are deleted)."""

from __future__ import annotations

import dataclasses
import json

from safetensors.torch import load_file

from lockedopd.bench import quality
from lockedopd.bench.experiment import load_experiment
from lockedopd.bench.geometry import GEOMETRY_FILE, TABLE1_KEYS
from lockedopd.opd import OPDTrainer, load_config
from lockedopd.subspace.basis_io import load_basis
from lockedopd.tasks import COLUMN_ADDITION
from lockedopd.tasks.base import write_task_splits
from tests.conftest import REPO, TINY_CONFIG


def test_a_locked_sft_run_moves_only_inside_the_locked_span_after_the_lock(tmp_path):
    files = write_task_splits(COLUMN_ADDITION, tmp_path / "task", {"train": 64, "validation": 8}, seed=0)
    run = tmp_path / "run"
    config = load_config(
        TINY_CONFIG,
        [f"output_dir={run}", "progress=false", "objective.name=sft", "max_steps=6", "lock.at_step=3",
         "lock.optimizer=projected_full", "save_steps=1", "eval_steps=0", "monitor.enabled=false",
         f"data.train_path={files['train']}", f"data.eval_path={files['validation']}", "lr=1e-2"],
    )  # fmt: skip
    summary = OPDTrainer.from_config(config).train()
    assert summary["lock_step"] == 3
    bases, _ = load_basis(run / "basis.safetensors")
    at_lock = load_file(str(run / "checkpoints" / "step-000003" / "model.safetensors"))
    final = load_file(str(run / "checkpoints" / "step-000006" / "model.safetensors"))
    moved = 0
    for name, (_, v) in bases.items():
        delta = final[f"{name}.weight"] - at_lock[f"{name}.weight"]  # the locked phase's whole update
        outside = delta - delta @ v @ v.T  # right mode: ΔW = C Vᵀ, so ΔW (I - V Vᵀ) = 0
        assert float(outside.norm()) <= 1e-5 * max(float(delta.norm()), 1e-12), name
        moved += float(delta.norm()) > 0
    assert moved == len(bases) > 0  # and every locked matrix did move inside its span


def test_a_geometry_grid_keeps_each_cells_trajectory_and_table_one(tmp_path):
    files = write_task_splits(COLUMN_ADDITION, tmp_path / "task", {"train": 64, "test": 8}, seed=0)
    base = load_experiment(REPO / "benchmarks" / "experiments" / "quality_tiny.yaml", str(tmp_path / "grid"))
    exp = dataclasses.replace(
        base,
        methods={"full": {"lock.enabled": False}, "sft": {"lock.enabled": False, "objective.name": "sft"},
                 "sft_locked": {"objective.name": "sft", "lock.at_step": 4, "lock.optimizer": "projected_full"}},
        seeds=[0],
        task="column_addition",
        geometry=True,
        overrides={**base.overrides, "eval_fixed_text": False, "eval_sampling_seeds": 1,
                   "data.train_path": str(files["train"]), "data.eval_size": 4,
                   "accuracy.verifier": "column_addition", "accuracy.path": str(files["test"]),
                   "accuracy.samples": 0, "rollout.max_new_tokens": 6},
    )  # fmt: skip
    quality.run(exp)
    for method in exp.methods:
        cell = exp.cell_dir(method, 0)
        geometry = json.loads((cell / GEOMETRY_FILE).read_text())
        assert [r["step"] for r in geometry["per_step"]] == [2, 4, 6, 8] and geometry["final_step"] == 8
        assert set(geometry["final"]) == set(TABLE1_KEYS) and 0.0 <= geometry["final"]["bf16_sparsity"] <= 1.0
        last = geometry["per_step"][-1]
        assert abs(last["subspace_similarity_mean"] - 1.0) < 1e-6  # the final update against itself
        norms = [r["update_fro_norm"] for r in geometry["per_step"]]
        assert all(n > 0 for n in norms) and not (cell / "checkpoints").exists()
    sft = json.loads((exp.cell_dir("sft", 0) / GEOMETRY_FILE).read_text())["per_step"]
    locked = json.loads((exp.cell_dir("sft_locked", 0) / GEOMETRY_FILE).read_text())["per_step"]
    # the same run up to the lock at step 4, then a different one
    assert [r["update_fro_norm"] for r in locked[:2]] == [r["update_fro_norm"] for r in sft[:2]]
    assert locked[-1]["update_fro_norm"] != sft[-1]["update_fro_norm"]
    report = json.loads((exp.out_dir / "results.json").read_text())
    assert set(report["methods"]) == set(exp.methods)
