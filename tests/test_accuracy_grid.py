"""Accuracy as the quality grid's headline: per-seed shares of the best full reference's gain, and a tiny grid."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lockedopd.bench import accuracy_report, quality
from lockedopd.bench.experiment import load_experiment
from lockedopd.tasks import COLUMN_ADDITION
from lockedopd.tasks.base import write_task_splits

REPO = Path(__file__).resolve().parents[1]


def cell(final, start=None, lock_step=None, sampled_final=None):
    acc = {0: start} if start is not None else {}
    if lock_step:
        acc[lock_step] = start
    acc[30] = final
    return {"lock_step": lock_step, "eval_accuracy": acc,
            "eval_accuracy_sampled": {k: (sampled_final if k == 30 and sampled_final is not None else v)
                                      for k, v in acc.items()}}  # fmt: skip


def test_shares_are_read_against_the_full_reference_with_the_larger_gain():
    cells = {
        "full": {0: cell(0.50, start=0.10), 1: cell(0.60, start=0.20)},  # gains 0.40, 0.40
        "full_factored": {0: cell(0.60), 1: cell(0.70)},  # gains 0.50, 0.50 (start from full's step 0)
        "locked_right": {0: cell(0.55, start=0.30, lock_step=8), 1: cell(0.40, start=0.30, lock_step=8)},
        "lora": {0: cell(0.35), 1: cell(0.45)},
    }
    out = accuracy_report.aggregate_accuracy(cells, list(cells))
    assert out["reference"] == "full_factored"
    assert out["reference_gains"]["full"]["mean"] == pytest.approx(0.40)
    assert out["student_start_accuracy"]["mean"] == pytest.approx(0.15)
    locked = out["methods"]["locked_right"]["share_of_full_accuracy_gain"]["per_seed"]
    assert locked["0"] == pytest.approx((0.55 - 0.30) / (0.60 - 0.30))  # post-lock gain, from its own lock step
    assert locked["1"] == pytest.approx((0.40 - 0.30) / (0.70 - 0.30))
    lora = out["methods"]["lora"]["share_of_full_accuracy_gain"]["per_seed"]
    assert lora == {"0": pytest.approx(0.25 / 0.50), "1": pytest.approx(0.25 / 0.50)}  # whole-run gain
    assert out["methods"]["full"]["share_of_full_accuracy_gain"]["mean"] == pytest.approx(0.8)
    assert out["methods"]["lora"]["accuracy"]["mean"] == pytest.approx(0.40)


def test_the_reference_is_chosen_on_the_seeds_both_candidates_have():
    # full has a weak extra seed; on the one seed both have, full's gain (0.90) beats factored's (0.80)
    cells = {
        "full": {0: cell(0.95, start=0.05), 1: cell(0.40, start=0.05)},
        "full_factored": {0: cell(0.85)},
    }
    out = accuracy_report.aggregate_accuracy(cells, list(cells))
    assert out["reference"] == "full"  # over all seeds, full's mean gain (0.625) would have lost to 0.80
    assert out["reference_gains"]["full"]["mean"] == pytest.approx(0.625)  # the reported interval keeps every seed


def test_a_method_from_its_own_student_measures_its_gain_from_its_own_start():
    anchored = {**cell(0.70, start=0.45), "own_student": True}  # an RL arm from an SFT anchor
    cells = {"rlvr": {0: anchored}, "full": {0: cell(0.95, start=0.05)}}  # the anchor's cell comes first
    out = accuracy_report.aggregate_accuracy(cells, list(cells))
    assert out["student_start_accuracy"]["mean"] == pytest.approx(0.05)  # the seed's shared step-0 student
    assert out["methods"]["rlvr"]["gain_start"]["0"] == pytest.approx(0.45)
    share = out["methods"]["rlvr"]["share_of_full_accuracy_gain"]["per_seed"]["0"]
    assert share == pytest.approx((0.70 - 0.45) / (0.95 - 0.45))


def test_only_a_method_with_another_student_evaluates_its_own_start(tmp_path):
    from lockedopd.bench.experiment import cell_overrides, has_own_student

    spec = {
        "base_config": str(REPO / "recipes/configs/column_addition.yaml"), "task": "column_addition",
        "out": str(tmp_path / "out"), "seeds": [0],
        "methods": {"opd": {"lock.enabled": False}, "sft": {"objective.name": "sft"},
                    "rlvr": {"student.source": "built:anchor.yaml", "student.keep_layers": None}},
    }  # fmt: skip
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(spec))
    exp = load_experiment(path)
    assert [has_own_student(exp, m) for m in exp.methods] == [False, False, True]
    assert [("eval_at_start=false" in cell_overrides(exp, m, 0)) for m in exp.methods] == [False, True, False]


def count_digits(completions, answers):
    """A verifier a random tiny model passes sometimes (the share of its completion that is digits)."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


def test_a_tiny_accuracy_grid_writes_the_headline_report(tmp_path):
    files = write_task_splits(COLUMN_ADDITION, tmp_path / "task", {"train": 64, "test": 8}, seed=0)
    exp = dataclasses.replace(
        load_experiment(REPO / "benchmarks" / "experiments" / "quality_tiny.yaml", str(tmp_path / "grid")),
        methods={"full": {"lock.enabled": False}, "full_factored": {"lock.enabled": False, "optimizer": "factored"},
                 "locked_right": {}},
        seeds=[0, 1],
        task="column_addition",
        teacher_model="tiny",  # scored once with the cells' accuracy settings
        targets=[{"method": "locked_right", "share_at_least": 0.5}],
        overrides={**load_experiment(REPO / "benchmarks" / "experiments" / "quality_tiny.yaml").overrides,
                   "data.train_path": str(files["train"]), "data.eval_size": 4,
                   "accuracy.verifier": "tests.test_accuracy_grid:count_digits", "accuracy.path": str(files["test"]),
                   "accuracy.samples": 2, "accuracy.batch_size": 8, "rollout.max_new_tokens": 6},
    )  # fmt: skip
    result = quality.run(exp)
    report = json.loads((exp.out_dir / "results.json").read_text())
    assert len(result["computed"]) == 6
    assert report["task"] == "column_addition" and report["reference"] in ("full", "full_factored")
    for name in ("full", "full_factored", "locked_right"):
        entry = report["methods"][name]
        assert entry["seeds"] == [0, 1]
        assert set(entry["accuracy"]) >= {"mean", "low", "high"}
        assert "share_of_full_accuracy_gain" in entry and entry["optimizer_state_bytes"] > 0
    lines = (exp.cell_dir("locked_right", 0) / "metrics.jsonl").read_text().splitlines()
    records = {json.loads(line)["step"]: json.loads(line) for line in lines}
    assert 0 not in records  # only full's cells evaluate the step-0 student
    lock = report["methods"]["locked_right"]["lock_step"]["0"]
    assert "eval_accuracy" in records[lock] and "eval_accuracy" in records[8]
    assert "eval_accuracy" not in records[2]  # the KL's period (2) does not measure accuracy
    assert report["student_start_accuracy"] is not None
    assert report["teacher_accuracy"] == report["teacher"]["greedy_accuracy"] and report["teacher"]["problems"] == 8
    text = (exp.out_dir / "results.md").read_text()
    assert text.index("## Task accuracy") < text.index("## Targets") < text.index("## Held-out reverse KL")
    (target,) = report["targets"]
    assert target["verdict"] == "pending" and target["seeds"] == {"locked_right": 2}  # a verdict needs 3 seeds
    share = report["methods"]["locked_right"]["share_of_full_accuracy_gain"]["mean"]
    assert target["measured"]["share"] == share
    assert (exp.out_dir / "accuracy.png").is_file()
