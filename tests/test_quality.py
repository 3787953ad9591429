"""The quality benchmark harness (lockedopd.bench) on the tiny grid: resumable cells, reports, share of gain."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from lockedopd.bench import aggregate, quality, quality_markdown, quality_report, stats
from lockedopd.bench.experiment import load_experiment
from lockedopd.bench.monitor import cell_ranking_agreement, monitor_figures, ranking_agreement
from lockedopd.opd import OPDTrainer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "benchmarks" / "experiments" / "quality_tiny.yaml"


class Killed(Exception):
    pass


def experiment(out, **changes):
    return dataclasses.replace(load_experiment(TINY, str(out)), **changes)


def test_killed_grid_resumes_without_recomputing_finished_cells(tmp_path, monkeypatch):
    exp = experiment(tmp_path / "grid", methods={"full": {"lock.enabled": False}, "locked_right": {}}, seeds=[0])
    first = quality.run(exp, max_cells=1)  # an invocation that stops after one cell
    assert first["computed"] == [("full", 0)]
    done = exp.cell_dir("full", 0)
    stamps = {name: (done / name).stat().st_mtime_ns for name in ("cell.json", "summary.json", "metrics.jsonl")}
    assert not (done / "checkpoints").exists()  # a finished cell keeps only its small files

    original = OPDTrainer.training_step

    def dies_at_step_5(self, step):
        if step == 5:
            raise Killed
        return original(self, step)

    monkeypatch.setattr(OPDTrainer, "training_step", dies_at_step_5)
    with pytest.raises(Killed):  # the second invocation is killed inside the second cell
        quality.run(exp)
    in_flight = exp.cell_dir("locked_right", 0)
    assert (in_flight / "checkpoints").is_dir() and not (in_flight / "cell.json").exists()
    monkeypatch.setattr(OPDTrainer, "training_step", original)

    third = quality.run(exp)
    assert third["computed"] == [("locked_right", 0)] and third["skipped"] == [("full", 0)]
    assert {name: (done / name).stat().st_mtime_ns for name in stamps} == stamps
    cell = json.loads((in_flight / "cell.json").read_text())
    assert cell["resumed_from"] == 4  # the last checkpoint before the kill (save_steps=2)
    # the resumed cell ends exactly where an uninterrupted run of it ends
    fresh = experiment(tmp_path / "fresh", methods={"locked_right": {}}, seeds=[0])
    quality.run(fresh)
    resumed_summary = json.loads((in_flight / "summary.json").read_text())
    fresh_summary = json.loads((fresh.cell_dir("locked_right", 0) / "summary.json").read_text())
    assert resumed_summary["final_reverse_kl"] == pytest.approx(fresh_summary["final_reverse_kl"], rel=1e-6)
    fourth = quality.run(exp)
    assert fourth["computed"] == [] and len(fourth["skipped"]) == 2


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    """The whole tiny grid (3 methods x 2 seeds) through the command line, as `lockedopd bench quality` runs it."""
    out = tmp_path_factory.mktemp("quality")
    proc = subprocess.run(
        [sys.executable, "-m", "lockedopd", "bench", "quality", str(TINY), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_results_json_has_the_documented_keys_with_numbers(tiny_grid):
    out, results, stdout = tiny_grid
    assert set(results["methods"]) == {"full", "locked_right", "locked_two_sided"}
    for name, m in results["methods"].items():
        assert m["seeds"] == [0, 1]
        for key in ("mean", "low", "high"):
            assert _is_number(m["share_of_full_gain"][key]), (name, key)
        assert _is_number(m["final_reverse_kl"]["mean"]) and _is_number(m["optimizer_state_bytes"])
        assert m["optimizer_state_bytes"] > 0 and m["trainable_params"] > 0
        steps = [int(s) for s in m["eval_reverse_kl"]]
        assert steps == [0, 2, 4, 6, 8]
        assert all(_is_number(m["eval_fixed_text_kl"][str(s)]["mean"]) for s in steps)
        assert m["wall_s"]["mean"] > 0
    full, right = results["methods"]["full"], results["methods"]["locked_right"]
    assert right["optimizer_state_bytes"] < full["optimizer_state_bytes"] / 5
    assert right["trainable_params"] < full["trainable_params"]
    assert full["share_of_full_gain"]["mean"] == 1.0
    for name in ("results.md", "quality.png"):
        assert (out / name).stat().st_size > 0
    assert "| locked_right | 2 |" in (out / "results.md").read_text() and "| locked_right | 2 |" in stdout


def test_shares_in_results_json_follow_from_the_cells_metrics(tiny_grid):
    out, results, _ = tiny_grid

    def evals(method, seed):
        path = out / "cells" / method / f"seed{seed}" / "metrics.jsonl"
        return {
            r["step"]: r["eval_reverse_kl"]
            for r in map(json.loads, path.read_text().splitlines())
            if "eval_reverse_kl" in r
        }

    for seed in (0, 1):
        full, locked = evals("full", seed), evals("locked_right", seed)
        lock = json.loads((out / "cells" / "locked_right" / f"seed{seed}" / "summary.json").read_text())["lock_step"]
        expected = (full[lock] - locked[8]) / (full[lock] - full[8])
        assert results["methods"]["locked_right"]["share_of_full_gain"]["per_seed"][str(seed)] == pytest.approx(
            expected
        )


def _cell(seed, kl, lock_step=None):
    facts = {"trainable_params": 10, "optimizer_state_bytes": 80, "wall_s": 1.0, "mean_step_time_s": 0.1}
    return {"seed": seed, "lock_step": lock_step, "eval_reverse_kl": kl, "final_step": max(kl), **facts,
            "eval_fixed_text_kl": {}}  # fmt: skip


def test_share_of_full_gain_on_a_hand_made_results_set():
    cells = {
        "full": {0: _cell(0, {0: 4.0, 4: 3.4, 8: 3.0, 30: 2.0}), 1: _cell(1, {0: 4.0, 8: 2.5, 30: 1.5})},
        "locked": {0: _cell(0, {0: 4.0, 8: 3.0, 30: 2.2}, 8), 1: _cell(1, {0: 4.0, 8: 2.5, 30: 1.6}, 8)},
        "early": {0: _cell(0, {0: 4.0, 6: 3.2, 30: 2.0}, 6)},
        "whole_run": {0: _cell(0, {0: 4.0, 30: 2.5})},  # never locks (GaLore): measured from step 0
    }
    methods = aggregate.aggregate(cells, ["full", "locked", "early", "whole_run"])
    share = methods["locked"]["share_of_full_gain"]
    assert share["per_seed"] == {"0": pytest.approx(0.8), "1": pytest.approx(0.9)}
    assert share["mean"] == pytest.approx(0.85)
    half = 12.706 * math.sqrt(0.005) / math.sqrt(2)  # t(0.975, 1) * sample std / sqrt(n)
    assert share["low"] == pytest.approx(0.85 - half, rel=1e-4) and share["high"] == pytest.approx(
        0.85 + half, rel=1e-4
    )
    assert methods["locked"]["final_reverse_kl"]["mean"] == pytest.approx(1.9)
    assert methods["locked"]["eval_reverse_kl"]["8"]["mean"] == pytest.approx(2.75)
    # a lock at step 6, where full OPD did not evaluate: KL_full(6) interpolated between steps 4 and 8 (3.2), flagged
    early = methods["early"]["share_of_full_gain"]
    assert early["per_seed"]["0"] == pytest.approx((3.2 - 2.0) / (3.2 - 2.0))
    assert early["seeds_with_interpolated_kl_lock"] == [0] and early["low"] is None
    assert methods["whole_run"]["share_of_full_gain"]["per_seed"] == {"0": pytest.approx((4.0 - 2.5) / (4.0 - 2.0))}
    with pytest.raises(ValueError, match="eval_steps"):
        stats.full_kl_at(cells["full"][1], 40)


def test_methods_are_compared_on_the_common_seeds_and_extra_seeds_reported_beside():
    cells = {
        "full": {0: _cell(0, {0: 4.0, 8: 3.0, 30: 2.0}), 1: _cell(1, {0: 4.0, 8: 2.5, 30: 1.5}),
                 2: _cell(2, {0: 4.0, 8: 3.5, 30: 3.0})},
        "locked": {0: _cell(0, {0: 4.0, 8: 3.0, 30: 2.2}, 8), 1: _cell(1, {0: 4.0, 8: 2.5, 30: 1.6}, 8),
                   2: _cell(2, {0: 4.0, 8: 3.5, 30: 2.5}, 8)},
        "lora": {0: _cell(0, {0: 4.0, 30: 2.4}), 1: _cell(1, {0: 4.0, 30: 2.0})},
    }  # fmt: skip
    methods, all_seeds = aggregate.aggregate_on_common_seeds(cells, ["full", "locked", "lora"], [0, 1])
    assert methods["full"]["seeds"] == [0, 1] and methods["full"]["final_reverse_kl"]["mean"] == pytest.approx(1.75)
    assert methods["locked"]["share_of_full_gain"]["mean"] == pytest.approx(0.85)  # seeds 0, 1: 0.8, 0.9
    assert set(all_seeds) == {"full", "locked"}  # lora ran only the common seeds
    wider = all_seeds["locked"]
    assert wider["seeds"] == [0, 1, 2] and wider["share_of_full_gain"]["per_seed"]["2"] == pytest.approx(2.0)
    assert wider["share_of_full_gain"]["mean"] == pytest.approx((0.8 + 0.9 + 2.0) / 3)
    assert wider["final_reverse_kl"]["mean"] == pytest.approx((2.2 + 1.6 + 2.5) / 3)
    report = {"experiment": "x", "base_config": "c", "overrides": {}, "seeds": [0, 1], "not_run": {},
              "pending_cells": [], "methods": methods, "all_seeds": all_seeds}  # fmt: skip
    md = quality_markdown.markdown_report(report)
    assert "| locked | 0, 1, 2 | 2.100 [" in md and "## With their extra seeds" in md
    assert "| locked | 2 | 8 | 2.5000 | 2.000 |" in md  # the per-seed table lists every seed a method ran


def test_methods_the_trainer_cannot_run_are_listed_as_not_run(tmp_path):
    exp = experiment(tmp_path / "grid", methods={"full": {"lock.enabled": False}, "lora": {"lock.mode": "lora"}},
                     seeds=[0])  # fmt: skip
    result = quality.run(exp)
    assert result["computed"] == [("full", 0)]
    assert "lock.mode" in result["report"]["not_run"]["lora"]
    assert "| lora | not run |" in (exp.out_dir / "results.md").read_text()
    assert "lora" not in result["report"]["methods"]


def test_bench_runs_the_quality_or_the_memory_benchmark_of_the_package(tmp_path, monkeypatch):
    import lockedopd.bench.memory as memory
    import lockedopd.bench.quality as quality
    from lockedopd import cli

    calls = []
    monkeypatch.setattr(memory, "main", lambda argv: calls.append(("memory", argv)) or 0)
    assert cli.main(["bench", "quality", str(TINY), "--out", str(tmp_path), "--rerender", "--quiet"]) == 0
    assert calls == [] and (tmp_path / "results.json").is_file()  # the quality harness rendered the report
    monkeypatch.setattr(quality, "main", lambda argv: calls.append(("quality", argv)) or 0)
    assert cli.main(["bench", "experiments/tiny.yaml", "--methods", "full"]) == 0
    assert cli.main(["bench", "quality", "x.yaml", "--pack"]) == 0
    assert calls == [("memory", ["experiments/tiny.yaml", "--methods", "full"]), ("quality", ["x.yaml", "--pack"])]


def test_readme_table_is_rewritten_from_results_json(tiny_grid, tmp_path):
    out, results, _ = tiny_grid
    readme = tmp_path / "README.md"
    readme.write_text(
        f"intro\n\n{quality_markdown.README_BEGIN}x -->\nstale table\n{quality_markdown.README_END}\n\nafter\n"
    )
    quality_markdown.update_readme(results, readme, "results.json")
    text = readme.read_text()
    assert "stale table" not in text and text.startswith("intro") and text.rstrip().endswith("after")
    row = next(line for line in text.splitlines() if line.startswith("| locked_right |"))
    final = results["methods"]["locked_right"]["eval_reverse_kl"]["8"]["mean"]
    assert f"{final:.3f}" in row
    share = results["methods"]["locked_right"]["share_of_full_gain"]["per_seed"]["1"]
    assert f"{share:.3f}" in row
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        quality_markdown.update_readme(results, readme, "results.json")


def test_monitor_figures_are_reported_per_method_and_ranked_against_the_measured_shares():
    def monitor(captured, predicted, drift=()):
        figures = {"captured_energy_mean": captured, "random_baseline": 0.025, "threshold": 0.125}
        return {"checks": 3, **figures, "predicted_progress_share": predicted, "cosine_to_adam_mean": 0.3,
                "drift_events": list(drift)}  # fmt: skip

    figures = monitor_figures([monitor(0.25, 0.8), monitor(0.35, 0.6), None])
    assert figures["seeds"] == 2 and figures["captured_energy_mean"] == pytest.approx(0.30)
    assert figures["predicted_progress_share"] == pytest.approx(0.7) and figures["flagged"] is False
    assert monitor_figures([monitor(0.10, 0.2)])["flagged"] is True  # below 5x a random subspace
    assert monitor_figures([monitor(0.30, 0.9, drift=[12])])["flagged"] is True
    assert monitor_figures([None, {"checks": 0}]) is None

    def method(predicted, measured):
        return {"monitor": {"predicted_progress_share": predicted}, "share_of_full_gain": {"mean": measured}}

    same = ranking_agreement({"a": method(0.9, 0.95), "b": method(0.5, 0.6), "c": method(0.1, 0.15)})
    assert same["kendall_tau"] == 1.0 and same["by_predicted_share"] == ["a", "b", "c"]
    swapped = ranking_agreement({"a": method(0.9, 0.6), "b": method(0.5, 0.95), "c": method(0.1, 0.15)})
    assert swapped["kendall_tau"] == pytest.approx(1 / 3) and swapped["by_measured_share"] == ["b", "a", "c"]
    assert ranking_agreement({"a": method(0.9, 0.95)}) is None

    # the next-batch estimate of seed 0 only is ranked against the seed-0 shares, not the 3-seed means
    per_seed = monitor_figures([{**monitor(0.3, 0.5), "next_batch_progress_share": 0.4}, monitor(0.3, 0.5)],
                                       seeds=[0, 1])  # fmt: skip
    assert per_seed["next_batch_progress_share"] == pytest.approx(0.4)
    assert per_seed["estimate_seeds"] == {"predicted_progress_share": [0, 1], "next_batch_progress_share": [0]}

    def seeded(estimate, shares):
        figures = {"next_batch_progress_share": estimate, "estimate_seeds": {"next_batch_progress_share": [0]}}
        mean = sum(shares.values()) / len(shares)
        return {"monitor": figures, "share_of_full_gain": {"mean": mean, "per_seed": shares}}

    # by the means a (0.75) beats b (0.6); on seed 0, where the estimate was taken, b (0.9) beats a (0.5)
    ranked = ranking_agreement(
        {"a": seeded(0.2, {"0": 0.5, "1": 1.0}), "b": seeded(0.3, {"0": 0.9, "1": 0.3})}, "next_batch_progress_share"
    )
    assert ranked["kendall_tau"] == 1.0 and ranked["estimate"] == "next_batch_progress_share"

    # run by run: both estimates on the runs that have the next-batch one, against each run's own share
    def runs(same, nxt, shares):
        per_seed = {"predicted_progress_share": same, "next_batch_progress_share": nxt}
        return {"monitor": {"per_seed": per_seed}, "share_of_full_gain": {"per_seed": shares}}

    by_run = cell_ranking_agreement({
        "a": runs({"0": 0.3, "1": 0.2}, {"0": 0.6}, {"0": 0.9, "1": 0.5}),  # seed 1 has no next-batch estimate
        "b": runs({"0": 0.4}, {"0": 0.5}, {"0": 0.7}),
        "c": runs({"0": 0.1}, {"0": 0.2}, {"0": 0.2}),
    })  # fmt: skip
    assert sorted(by_run["cells"]) == ["a/seed0", "b/seed0", "c/seed0"]
    assert by_run["next_batch_progress_share"] == 1.0  # 0.6 > 0.5 > 0.2 as 0.9 > 0.7 > 0.2
    assert by_run["predicted_progress_share"] == pytest.approx(1 / 3)  # a and b swapped


def _screened(kl, fixed):
    entry = {"final_reverse_kl": {"mean": kl}}
    if fixed is not None:
        entry["final_fixed_text_kl"] = {"mean": fixed}
    return entry


def test_learning_rate_selection_takes_the_lowest_fixed_text_kl_not_the_lowest_held_out_kl():
    methods = {
        "lora_x10": _screened(3.285, 7.525),
        "lora_x30": _screened(2.013, 6.363),
        "lora_x100": _screened(0.709, 9.935),  # the lowest held-out KL, but collapsed coverage
        "galore_a": _screened(3.188, None),
        "galore_b": _screened(2.5, 7.0),
    }
    screens = {"lora": ["lora_x10", "lora_x30", "lora_x100"], "galore": ["galore_a", "galore_b", "galore_c"]}
    chosen = quality_report.select_learning_rates(methods, screens)
    assert chosen["lora"]["selected"] == "lora_x30" and chosen["lora"]["complete"]
    assert chosen["lora"]["candidates"]["lora_x100"] == {"final_reverse_kl": 0.709, "final_fixed_text_kl": 9.935}
    # galore_a ran without the fixed-text evaluation and galore_c did not run: a choice, marked incomplete
    assert chosen["galore"]["selected"] == "galore_b" and not chosen["galore"]["complete"]
    assert chosen["galore"]["candidates"]["galore_c"] is None
    selection = {"rule": quality_report.LR_SELECTION_RULE, "families": chosen}
    report = {"experiment": "x", "base_config": "c", "overrides": {}, "seeds": [0], "not_run": {},
              "pending_cells": [], "methods": {}, "lr_selection": selection}  # fmt: skip
    md = quality_markdown.markdown_report(report)
    assert "| lora | lora_x30 | 2.013 | 6.363 | **yes** |" in md
    assert "| galore | galore_c | not run | | |" in md and "| galore | (incomplete" in md


def test_lr_screens_must_name_methods_of_the_experiment(tmp_path):
    with pytest.raises(ValueError, match=r"lr_screens.lora must list methods of this experiment"):
        experiment(tmp_path, lr_screens={"lora": ["full", "lora_x3"]})


def test_distinct_colours_keeps_twenty_methods_apart_dark_shades_first():
    from lockedopd.runtime.plotting import distinct_colours

    names = [f"m{i}" for i in range(21)]
    colours = distinct_colours(names + ["m0"])  # a repeated name keeps its first colour
    assert len(colours) == 21 and len(set(list(colours.values())[:20])) == 20
    assert colours["m20"] == colours["m0"]  # the 21st cycles back
    # the first 10 are tab20's dark shades (even indices), the next 10 its light ones
    import matplotlib.pyplot as plt

    tab20 = plt.get_cmap("tab20").colors
    assert [colours[f"m{i}"] for i in range(10)] == [tab20[2 * i] for i in range(10)]
    assert [colours[f"m{i}"] for i in range(10, 20)] == [tab20[2 * i + 1] for i in range(10)]


def test_extra_seeds_add_cells_for_one_method_and_need_the_full_run_of_the_same_seed(tmp_path):
    exp = experiment(tmp_path, seeds=[0, 1])
    methods = list(exp.methods)
    other = next(m for m in methods if m != "full")
    wider = dataclasses.replace(exp, extra_seeds={"full": [5, 3], other: [3]})
    assert wider.seeds_of("full") == [0, 1, 5, 3] and wider.seeds_of(other) == [0, 1, 3]
    cells = wider.cells()
    assert len(cells) == 2 * len(methods) + 3
    assert cells[: len(wider.seeds_of("full"))] == [("full", 0), ("full", 1), ("full", 5), ("full", 3)]
    seed_major = dataclasses.replace(wider, order="seed_major").cells()
    # the common seeds as listed, then the extra ones ascending; a seed's cells only for the methods that run it
    assert seed_major[-3:] == [("full", 3), (other, 3), ("full", 5)]
    with pytest.raises(ValueError, match=r"extra_seeds.* runs seed 3 but 'full' does not.*extra_seeds.full"):
        dataclasses.replace(exp, extra_seeds={other: [3]})
    with pytest.raises(ValueError, match=r"repeats seed 1"):
        dataclasses.replace(exp, extra_seeds={"full": [1]})
    with pytest.raises(ValueError, match=r"not a method"):
        dataclasses.replace(exp, extra_seeds={"nope": [3], "full": [3]})


def test_a_seed_outside_the_experiment_is_refused_before_anything_runs(tmp_path):
    exp = experiment(tmp_path / "grid", seeds=[0])
    with pytest.raises(ValueError, match=r"--seeds: seed 7 is not a seed of the experiment .*add it to `seeds`"):
        quality.run(exp, seeds=[7])
    assert not (exp.out_dir / "cells").exists()  # nothing was trained or written
