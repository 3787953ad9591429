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
        methods={"opd": {"lock.enabled": False}, "sft": {"lock.enabled": False, "objective.name": "sft"},
                 "sft_locked": {"objective.name": "sft", "lock.at_step": 4, "lock.optimizer": "projected_full"}},
        seeds=[0],
        task="column_addition",
        geometry=True,
        report="paper",
        overrides={**base.overrides, "eval_fixed_text": False, "eval_sampling_seeds": 1,
                   "data.train_path": str(files["train"]), "data.eval_size": 4,
                   "accuracy.verifier": "tests.test_accuracy_grid:count_digits", "accuracy.path": str(files["test"]),
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
    assert len(report["findings"]) + len(report["findings_not_measured"]) >= 8
    assert {f["verdict"] for f in report["findings"]} <= {"reproduced", "not reproduced", "opposite"}
    verdicts = {f["id"]: f["verdict"] for f in report["findings_not_measured"]}
    assert verdicts["bf16_sparsity"] == "not measured"  # no RLVR cell yet: nothing is claimed without one
    assert {f["id"] for f in report["findings"]} == {"opd_rank_band", "sft_rank_expands"}  # what OPD and SFT measure
    assert set(report["sufficiency"]) == {"opd", "sft", "sft_verbose"}
    assert set(report["sufficiency"]["sft"]["share"]) >= {"mean"}
    assert report["trajectories"]["opd"]["steps"] == [2, 4, 6, 8] and report["trajectories"]["sft_locked"][
        "seeds"
    ] == [0]
    text = (exp.out_dir / "findings.md").read_text()
    assert "| bf16_sparsity |" in text and "- SFT:" in text
    assert (exp.out_dir / "trajectories.png").is_file() and (exp.out_dir / "early_subspace.png").is_file()


def _cell(ranks, norms, sims, final, acc=None, lock=None):
    per_step = [{"step": 4 * (i + 1), "stable_rank_median": r, "update_fro_norm": n, "hill_alpha_median": 2.0,
                 "subspace_similarity_mean": s} for i, (r, n, s) in enumerate(zip(ranks, norms, sims))]  # fmt: skip
    return {"geometry": {"per_step": per_step, "final": final}, "lock_step": lock, "eval_accuracy": acc or {}}


def _table(sparsity, density, angle, nss, low, principal=0.28):
    return {"bf16_sparsity": sparsity, "update_density": density, "principal_angle_max_deg": angle, "nss": nss,
            "low_magnitude_overlap": low, "principal_mask_overlap": principal, "stable_rank": 20.0}  # fmt: skip


def paper_like_cells(flip: bool = False):
    """Cells that behave as the paper reports (``flip``: SFT and RLVR swapped, the locked SFT keeping its gain)."""
    sft_arm = dict(ranks=[10, 30, 60], norms=[1, 2, 3], sims=[0.3, 0.6, 1.0], final=_table(0.08, 0.93, 12, 0.3, 0.32))
    rlvr_arm = dict(ranks=[30, 20, 15], norms=[0.1, 0.2, 0.3], sims=[0.4, 0.7, 1.0],
                    final=_table(0.77, 0.28, 0.4, 0.01, 0.73))  # fmt: skip
    if flip:
        sft_arm, rlvr_arm = rlvr_arm, sft_arm
    cells = {}
    for seed in (0, 1, 2):
        jitter = 0.01 * seed
        cells.setdefault("sft", {})[seed] = _cell(**sft_arm, acc={0: 0.0, 40: 0.9 + jitter})
        cells.setdefault("sft_verbose", {})[seed] = _cell(**sft_arm, acc={0: 0.0, 40: 0.85 + jitter})
        cells.setdefault("rlvr", {})[seed] = _cell(**rlvr_arm, acc={0: 0.0, 40: 0.2})
        opd_table = _table(0.5, 0.46, 1.0, 0.1, 0.54)
        cells.setdefault("opd", {})[seed] = _cell([22, 25, 24], [1, 1.5, 2], [0.8 + jitter, 0.9, 1.0], opd_table,
                                                  acc={0: 0.0, 40: 0.8})  # fmt: skip
        cells.setdefault("opd_locked", {})[seed] = _cell([22, 23, 23], [1, 1.4, 1.9], [0.8, 0.9, 1.0],
                                                         _table(0.5, 0.46, 1.0, 0.1, 0.54),
                                                         acc={8: 0.5, 40: 0.79 - jitter}, lock=8)  # fmt: skip
        sft_kept = 0.97 + jitter if flip else 0.6 + jitter
        cells.setdefault("sft_locked", {})[seed] = _cell([10, 12, 12], [1, 1.5, 2], [0.3, 0.6, 1.0],
                                                         _table(0.1, 0.9, 10, 0.3, 0.3),
                                                         acc={8: 0.4, 40: sft_kept}, lock=8)  # fmt: skip
        cells.setdefault("sft_verbose_locked", {})[seed] = _cell([10, 12, 12], [1, 1.5, 2], [0.3, 0.6, 1.0],
                                                                 _table(0.1, 0.9, 10, 0.3, 0.3),
                                                                 acc={8: 0.3, 40: sft_kept - 0.1}, lock=8)  # fmt: skip
    for seed in (0, 1):
        for name in ("keep_top_50", "keep_top_25", "keep_random_50", "keep_random_25", "offpolicy_teacher",
                     "offpolicy_initial", "mix_0.75", "mix_0.5"):  # fmt: skip
            cells.setdefault(name, {})[seed] = _cell([23, 26, 25], [1, 1.6, 2.2], [0.8, 0.9, 1.0], _table(*[0.5] * 5))
        for name in ("mix_0.25", "mix_0"):
            cells.setdefault(name, {})[seed] = _cell(
                [30, 20, 14], [0.1, 0.2, 0.3], [0.4, 0.7, 1.0], _table(*[0.5] * 5)
            )
    return cells


def test_findings_from_cells_that_behave_like_the_paper_are_all_reproduced():
    from lockedopd.bench.paper_arms import sufficiency
    from lockedopd.bench.paper_findings import findings

    found = {f["id"]: f for f in findings(paper_like_cells())}
    assert len(found) >= 8 and all(set(f) >= {"id", "claim", "paper", "measured", "verdict"} for f in found.values())
    assert {f["verdict"] for f in found.values()} == {"reproduced"}, {k: f["verdict"] for k, f in found.items()}
    suff = sufficiency(paper_like_cells())
    assert suff["opd"]["seeds"] == [0, 1, 2] and suff["sft"]["seeds"] == [0, 1, 2]
    # OPD seed 1: (0.78 - 0.5) / (0.8 - 0.5); SFT seed 2: (0.62 - 0.4) / (0.92 - 0.4)
    assert abs(suff["opd"]["per_seed"][1] - 0.28 / 0.3) < 1e-9 and abs(suff["sft"]["per_seed"][2] - 0.22 / 0.52) < 1e-9
    assert suff["sft"]["share"]["high"] < suff["opd"]["share"]["low"]
    # the off-distribution SFT arm, seed 0: (0.5 - 0.3) / (0.85 - 0.3)
    assert abs(suff["sft_verbose"]["per_seed"][0] - 0.2 / 0.55) < 1e-9
    assert found["sufficiency_contrast_off_distribution"]["measured"].startswith("SFT (off-distribution) keeps 0.3")


def test_findings_turn_opposite_when_sft_and_rlvr_swap_and_the_locked_sft_keeps_its_gain():
    from lockedopd.bench.paper_findings import findings

    found = {f["id"]: f["verdict"] for f in findings(paper_like_cells(flip=True))}
    for fid in ("bf16_sparsity", "update_density", "principal_angle_rotation", "low_magnitude_overlap",
                "sft_rank_expands", "rlvr_rank_contracts", "sufficiency_contrast", "sft_off_distribution_rank_expands",
                "sufficiency_contrast_off_distribution"):  # fmt: skip
        assert found[fid] == "opposite", (fid, found[fid])
    assert found["sufficiency_opd"] == "reproduced" and found["objective_mixing"] == "reproduced"


def test_bench_paper_runs_only_paper_experiments():
    from lockedopd.cli import main

    assert main(["bench", "paper", str(REPO / "benchmarks" / "experiments" / "quality_tiny.yaml"), "--rerender"]) == 2
    experiment = load_experiment(REPO / "benchmarks" / "experiments" / "paper_column_addition.yaml")
    assert experiment.report == "paper" and experiment.geometry
    assert {"opd", "opd_locked"} <= set(experiment.methods)


def test_a_checkpoint_without_a_measured_rank_leaves_its_seed_out_instead_of_failing():
    from lockedopd.bench.paper_findings import findings

    cells = paper_like_cells()
    cells["opd"][0]["geometry"]["per_step"][0]["stable_rank_median"] = None  # e.g. no update yet at step 4
    found = {f["id"]: f for f in findings(cells)}
    assert found["opd_rank_band"]["verdict"] == "reproduced" and "(n=1)" not in found["opd_rank_band"]["measured"]


def test_a_control_family_is_reproduced_only_once_every_variant_ran():
    from lockedopd.bench.paper_findings import findings

    cells = paper_like_cells()
    del cells["keep_random_50"], cells["mix_0.25"]
    found = {f["id"]: f for f in findings(cells)}
    # the variants that ran behave as the paper found, but the claim is about all of them
    assert found["token_sparsification"]["verdict"] == "not measured"
    assert found["token_sparsification"]["measured"].endswith("; not run yet: keep_random_50")
    assert (
        "keep_top_50: keeps (median stable rank at the end 25 vs OPD's 24, ‖ΔW‖_F 2.2 vs 2; 2 seeds)"
        in found["token_sparsification"]["measured"]
    )
    assert found["objective_mixing"]["verdict"] == "not measured"
    # one variant against the paper settles it before the rest run
    cells["mix_0"] = cells["mix_0.75"]  # λ = 0 keeps OPD's trajectory: the paper's departs
    assert {f["id"]: f["verdict"] for f in findings(cells)}["objective_mixing"] == "not reproduced"
    cells = paper_like_cells()
    for name in ("mix_0.25", "mix_0"):
        cells[name] = cells["mix_0.75"]
    cells["mix_0.75"] = cells["mix_0.5"] = paper_like_cells()["mix_0"]  # every variant the other way round
    assert {f["id"]: f["verdict"] for f in findings(cells)}["objective_mixing"] == "opposite"


def test_a_claim_against_two_arms_waits_for_both():
    from lockedopd.bench.paper_findings import findings

    cells = paper_like_cells()
    del cells["rlvr"]  # OPD's early alignment against SFT alone is half the claim
    assert {f["id"]: f["verdict"] for f in findings(cells)}["early_subspace"] == "not measured"
    cells = paper_like_cells()
    for cell in cells["rlvr"].values():  # RLVR aligned earlier than OPD on every seed: the claim fails
        cell["geometry"]["per_step"][0]["subspace_similarity_mean"] = 0.99
    assert {f["id"]: f["verdict"] for f in findings(cells)}["early_subspace"] == "not reproduced"


def _with_monitor(cells, estimates):
    """``estimates``: {locked cell name: {seed: the monitor's predicted_progress_share}}."""
    for name, by_seed in estimates.items():
        for seed, estimate in by_seed.items():
            cells[name][seed]["summary"] = {
                "monitor": {"predicted_progress_share": estimate, "captured_energy_mean": 0.3, "drift_events": [20]}
            }
    return cells


def test_the_monitor_agrees_only_when_its_estimate_orders_the_locks_as_their_measured_shares():
    from lockedopd.bench.paper_monitor import monitor_on_locks

    assert monitor_on_locks(paper_like_cells())["verdict"] == "not measured"  # no monitor summaries
    low_on_sft = {"opd_locked": {0: 0.20, 1: 0.18, 2: 0.19}, "sft_locked": {0: 0.05, 1: 0.07, 2: 0.06}}
    agrees = monitor_on_locks(_with_monitor(paper_like_cells(), low_on_sft))
    assert agrees["verdict"] == "agrees" and agrees["seeds"] == [0, 1, 2]
    # SFT seed 1 kept (0.61 - 0.4) / (0.91 - 0.4) of its gain, and the monitor's reading sits beside it
    entry = agrees["per_seed"]["sft"][1]
    assert abs(entry["measured"] - 0.21 / 0.51) < 1e-9 and entry["estimate"] == 0.07 and entry["drift_events"] == [20]
    # the locked SFT keeping more than the locked OPD while the monitor still reads it lower: opposite
    assert monitor_on_locks(_with_monitor(paper_like_cells(flip=True), low_on_sft))["verdict"] == "opposite"
    one_seed_wrong = {**low_on_sft, "sft_locked": {0: 0.05, 1: 0.30, 2: 0.06}}
    assert monitor_on_locks(_with_monitor(paper_like_cells(), one_seed_wrong))["verdict"] == "mixed"


def test_the_monitor_verdict_is_given_per_sft_arm_and_over_all_of_them():
    from lockedopd.bench.paper_monitor import monitor_on_locks

    estimates = {"opd_locked": {0: 0.2, 1: 0.2}, "sft_locked": {0: 0.05, 1: 0.05},
                 "sft_verbose_locked": {0: 0.3, 1: 0.25}}  # fmt: skip
    monitor = monitor_on_locks(_with_monitor(paper_like_cells(), estimates))
    # both SFT locks keep less than OPD's (≈0.4 vs ≈0.97): the SFT estimates read lower, the off-distribution higher
    assert monitor["verdict_by_arm"] == {"sft": "agrees", "sft_verbose": "opposite"}
    assert monitor["verdict"] == "mixed" and monitor["seeds"] == [0, 1]
    del estimates["sft_verbose_locked"][1]
    estimates["sft_verbose_locked"][0] = 0.1
    monitor = monitor_on_locks(_with_monitor(paper_like_cells(), estimates))
    assert monitor["verdict_by_arm"]["sft_verbose"] == "agrees" and monitor["verdict"] == "agrees"


def test_findings_markdown_shows_the_monitor_beside_the_measured_shares():
    from lockedopd.bench.paper_report import findings_markdown, paper_section

    cells = _with_monitor(paper_like_cells(), {"opd_locked": {0: 0.2}, "sft_locked": {0: 0.05}})
    report = {"task": "t", "experiment": "e", **paper_section(cells)}
    text = findings_markdown(report)
    assert "**agrees**" in text and "| SFT | 0 | 0.050 |" in text and "| OPD | 1 | — |" in text


def test_findings_markdown_names_an_arm_that_starts_from_its_own_student():
    from lockedopd.bench.paper_report import findings_markdown, paper_section

    cells = paper_like_cells()
    anchor = ['student.source="built:anchor.yaml"', "student.keep_layers=null"]
    for cell in cells["rlvr"].values():
        cell.update(own_student=True, overrides=["lr=3e-05", *anchor, "seed=0"])
    report = {"task": "t", "experiment": "e", **paper_section(cells)}
    assert report["own_starts"] == {"rlvr": anchor}
    text = findings_markdown(report)
    assert (
        'RLVR starts from its own student (`student.source="built:anchor.yaml"`, `student.keep_layers=null`)' in text
    )
    assert "SFT starts" not in text and "OPD starts" not in text


def test_the_controls_summary_gives_each_variants_gap_to_opd_beside_opds_own_seed_spread():
    from lockedopd.bench.paper_controls import controls_summary
    from lockedopd.bench.paper_report import findings_markdown, paper_section

    cells = paper_like_cells()
    cells["opd"][2]["geometry"]["per_step"][1]["stable_rank_median"] = 28  # OPD's mean trajectory: 22, 26, 24
    cells["mix_0"][1]["eval_accuracy"] = {40: 0.1}
    rows = {r["variant"]: r for r in controls_summary(cells)}
    assert rows["opd"]["family"] == "baseline" and abs(rows["opd"]["largest_gap"] - 2 / 26) < 1e-12
    assert abs(rows["opd"]["greedy_accuracy_end"] - 0.8) < 1e-12 and rows["opd"]["seeds"] == [0, 1, 2]
    assert abs(rows["keep_top_50"]["largest_gap"] - 1 / 22) < 1e-12  # 23 vs 22 at the first checkpoint
    assert abs(rows["mix_0"]["largest_gap"] - 10 / 24) < 1e-12  # 14 vs 24 at the last: past the ±25% band
    assert rows["mix_0"]["family"] == "objective mixing" and rows["mix_0"]["seeds"] == [0, 1]
    assert rows["mix_0"]["stable_rank_end"] == 14 and abs(rows["mix_0"]["update_norm_end"] - 0.3) < 1e-12
    assert rows["mix_0"]["greedy_accuracy_end"] == 0.1 and rows["keep_top_50"]["greedy_accuracy_end"] is None
    del cells["keep_random_50"]
    assert "keep_random_50" not in {r["variant"] for r in controls_summary(cells)}
    report = {"task": "t", "experiment": "e", **paper_section(cells)}
    text = findings_markdown(report)
    assert "| mix_0 | objective mixing | 0, 1 | 41.7% | 14 | 0.3 | 0.100 |" in text
    assert "| opd (seed to seed) | baseline | 0, 1, 2 | 7.7% |" in text
    assert controls_summary({"mix_0": cells["mix_0"]}) == []  # nothing to compare with
