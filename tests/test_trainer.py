"""The OPD loop on the tiny recipe: it learns, it locks, it resumes to the same result, it rejects bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lockedopd.opd import OPDTrainer, load_config
from lockedopd.subspace import load_basis
from tests.conftest import TINY_CONFIG

TIMING_KEYS = ("step_time_s", "rollout_s", "score_s")


def tiny_config(out, *overrides):
    return load_config(TINY_CONFIG, [f"output_dir={out}", "progress=false", *overrides])


class Killed(Exception):
    pass


def run(out, *overrides, kill_at=None):
    trainer = OPDTrainer.from_config(tiny_config(out, *overrides))
    if kill_at is not None:
        original = trainer.training_step

        def training_step(step):
            if step == kill_at:
                raise Killed
            return original(step)

        trainer.training_step = training_step
        with pytest.raises(Killed):
            trainer.train()
        return None
    return trainer.train()


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out, step=12):
    return load_file(out / "checkpoints" / f"step-{step:06d}" / "model.safetensors")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    summary = run(out, "save_steps=1")
    return out, summary


def test_tiny_run_learns_and_locks(reference_run):
    out, summary = reference_run
    assert summary["steps"] == 12
    assert summary["final_reverse_kl"] < summary["initial_reverse_kl"] - 0.1
    assert summary["lock_step"] == 6 and summary["lock_reason"] == "max_warmup_steps"
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(13))
    assert [r["phase"] for r in records[1:]] == ["warmup"] * 6 + ["locked"] * 6
    # the student has 2 layers x 7 target matrices, hidden 32 / intermediate 64
    full = 2 * (4 * 32 * 32 + 3 * 32 * 64)
    locked = 2 * (4 * 32 * 4 + 2 * 64 * 4 + 32 * 4)  # out x r per matrix, r = 4
    assert records[1]["trainable_params"] == full
    assert records[-1]["trainable_params"] == locked
    assert (
        summary["phases"]["locked"]["optimizer_state_bytes"] < summary["phases"]["warmup"]["optimizer_state_bytes"] / 5
    )
    for name in ("config.yaml", "summary.json", "curves.png", "basis.safetensors", "lock.json"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_locked_update_lies_in_the_basis(reference_run):
    out, _ = reference_run
    lock_base = load_file(out / "lock" / "gen-0" / "base_model.safetensors")
    final = final_weights(out)
    bases, meta = load_basis(out / "basis.safetensors")
    assert meta["step"] == "6" and len(bases) == 14
    for name, (_, V) in bases.items():
        delta = (final[f"{name}.weight"] - lock_base[f"{name}.weight"]).double()
        V = V.double()
        assert delta.norm() > 0, name
        assert (delta - delta @ V @ V.T).norm() <= 1e-5 * max(1.0, float(delta.norm())), name
    # weights outside the targets never move
    assert torch.equal(final["model.embed_tokens.weight"], lock_base["model.embed_tokens.weight"])


def _same_records(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            if key in TIMING_KEYS:
                continue
            if isinstance(x[key], float):
                assert math.isclose(x[key], y[key], rel_tol=1e-9, abs_tol=1e-12), (x["step"], key)
            else:
                assert x[key] == y[key], (x["step"], key)


@pytest.mark.parametrize("kill_at", [3, 6, 9], ids=["in-warmup", "right-after-lock", "locked"])
def test_killed_run_resumes_to_the_same_result(reference_run, tmp_path, kill_at):
    ref_out, ref_summary = reference_run
    run(tmp_path, "save_steps=1", kill_at=kill_at)
    resumed = run(tmp_path, "save_steps=1", "resume=true")
    assert resumed["final_reverse_kl"] == ref_summary["final_reverse_kl"]
    _same_records(read_metrics(ref_out), read_metrics(tmp_path))
    a, b = final_weights(ref_out), final_weights(tmp_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_half_written_checkpoint_is_ignored_on_resume(reference_run, tmp_path):
    run(tmp_path, "save_steps=2", kill_at=5)
    (tmp_path / "checkpoints" / ".tmp-step-000005-x").mkdir()  # what a kill during a save leaves behind
    resumed = run(tmp_path, "save_steps=2", "resume=true")
    assert resumed["steps"] == 12


def test_at_step_and_basis_path_locks(reference_run, tmp_path):
    ref_out, _ = reference_run
    forced = run(tmp_path / "forced", "max_steps=4", "lock.at_step=2", "lock.max_warmup_steps=null")
    assert forced["lock_step"] == 2 and forced["lock_reason"] == "at_step"
    from_file = run(tmp_path / "file", "max_steps=3", f"lock.basis_path={ref_out / 'basis.safetensors'}")
    assert from_file["lock_step"] == 0 and from_file["lock_reason"] == "basis_path"
    phases = [r["phase"] for r in read_metrics(tmp_path / "file")]
    assert phases == ["locked"] * 4


def test_unconstrained_run_has_no_lock(tmp_path):
    summary = run(tmp_path, "lock.enabled=false", "max_steps=2", "eval_steps=0")
    assert "lock_step" not in summary
    assert {r["phase"] for r in read_metrics(tmp_path)} == {"full"}


def test_vocabulary_mismatch_is_rejected_before_writing(tmp_path, tiny_tokenizer):
    from lockedopd.models import build_tiny_llama

    other = build_tiny_llama(len(tiny_tokenizer) + 7, num_layers=1)  # a teacher with a different vocabulary
    other.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    config = tiny_config(tmp_path / "run", f"teacher.model.source={tmp_path / 'teacher'}")
    with pytest.raises(ValueError, match=r"teacher vocabulary size \(110\) differs from the student's \(103\)"):
        OPDTrainer.from_config(config).train()
    assert not (tmp_path / "run").exists()


def test_missing_and_empty_prompt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file .* does not exist"):
        OPDTrainer.from_config(tiny_config(tmp_path / "a", f"data.train_path={tmp_path / 'nope.jsonl'}"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        OPDTrainer.from_config(tiny_config(tmp_path / "b", f"data.train_path={empty}"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 has no non-empty"):
        OPDTrainer.from_config(tiny_config(tmp_path / "c", f"data.train_path={bad}"))
    assert not any((tmp_path / d).exists() for d in "abc")


def test_existing_run_needs_resume_flag(reference_run):
    out, _ = reference_run
    with pytest.raises(FileExistsError, match="resume=true"):
        OPDTrainer.from_config(tiny_config(out)).train()


def test_cli_distill_and_error_exit(tmp_path, capsys):
    from lockedopd.cli import main

    assert (
        main(
            [
                "distill",
                str(TINY_CONFIG),
                f"output_dir={tmp_path / 'cli'}",
                "max_steps=2",
                "progress=false",
                "eval_steps=0",
                "lock.enabled=false",
            ]
        )
        == 0
    )
    assert "held-out reverse KL" in capsys.readouterr().out
    assert main(["distill", str(TINY_CONFIG), "bogus_key=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'bogus_key'" in err and "Traceback" not in err


def test_run_comparison_plot(reference_run, tmp_path):
    from lockedopd.opd.plots import plot_run_comparison

    out, _ = reference_run
    png = plot_run_comparison([out], ["tiny"], tmp_path / "cmp.png")
    assert png.stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="lockedopd run directory"):
        plot_run_comparison([tmp_path / "nothing"], ["x"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="labels"):
        plot_run_comparison([out], [], tmp_path / "y.png")


RELOCK = ("max_steps=16", "save_steps=1", "eval_steps=4", "monitor.on_drift=relock", "monitor.capture_threshold=0.99",
          "monitor.patience=1")  # fmt: skip


@pytest.fixture(scope="module")
def relock_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("relock")
    summary = run(out, *RELOCK)
    assert [e["event"] for e in summary["lock_events"]][:3] == ["lock", "relock-start", "lock"]
    return out, summary


def test_resume_from_the_first_lock_after_a_relock_trains_the_same_model(relock_run, tmp_path):
    """Each lock writes its own files: a checkpoint of the first locked generation, resumed after the second lock
    happened, reproduces the uninterrupted run (it used to load the relock's basis and base weights silently)."""
    import shutil

    ref, summary = relock_run
    first_lock, relock = summary["lock_events"][0]["step"], summary["lock_events"][2]["step"]
    assert (ref / "lock" / "gen-0" / "basis.safetensors").is_file() and (ref / "lock" / "gen-1").is_dir()
    resume_at = first_lock + 1
    shutil.copytree(ref, tmp_path / "run")
    for step, path in [(int(p.name[5:]), p) for p in (tmp_path / "run" / "checkpoints").iterdir()]:
        if step > resume_at:
            shutil.rmtree(path)
    assert resume_at < relock
    resumed = run(tmp_path / "run", *RELOCK, "resume=true")
    assert resumed["final_reverse_kl"] == summary["final_reverse_kl"]
    a, b = final_weights(ref, 16), final_weights(tmp_path / "run", 16)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    _same_records(read_metrics(ref), read_metrics(tmp_path / "run"))


def test_a_changed_lock_file_is_refused_on_resume(relock_run, tmp_path):
    import shutil

    ref, summary = relock_run
    shutil.copytree(ref, tmp_path / "run")
    resume_at = summary["lock_events"][0]["step"] + 1
    for step, path in [(int(p.name[5:]), p) for p in (tmp_path / "run" / "checkpoints").iterdir()]:
        if step > resume_at:
            shutil.rmtree(path)
    # another generation's basis in place of this one's: same shapes, other content
    shutil.copyfile(
        ref / "lock" / "gen-1" / "basis.safetensors", tmp_path / "run" / "lock" / "gen-0" / "basis.safetensors"
    )
    with pytest.raises(ValueError, match=r"gen-0/basis.safetensors is not the file the step-7 checkpoint was trained"):
        run(tmp_path / "run", *RELOCK, "resume=true")


def test_resume_refuses_config_drift_and_records_allowed_changes(tmp_path):
    run(tmp_path, "max_steps=4", "eval_steps=0")
    original = (tmp_path / "config.yaml").read_text()
    allowed = r"only \['accuracy.eval_steps', 'eval_at_start', 'eval_steps', 'fsdp', 'malloc_mmap_threshold'"
    with pytest.raises(ValueError, match=r"lr: 0\.003 -> 0\.001.*" + allowed):
        run(tmp_path, "max_steps=6", "eval_steps=0", "lr=1e-3", "resume=true")
    with pytest.raises(ValueError, match=r"lock\.mode: 'right' -> 'two_sided'"):
        run(tmp_path, "max_steps=6", "eval_steps=0", "lock.mode=two_sided", "resume=true")
    assert (tmp_path / "config.yaml").read_text() == original and not (tmp_path / "config_changes.jsonl").exists()
    summary = run(tmp_path, "max_steps=6", "eval_steps=0", "resume=true")
    assert summary["steps"] == 6
    assert (tmp_path / "config.yaml").read_text() == original  # the run's provenance is kept
    changes = [json.loads(line) for line in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
    assert changes == [{"resumed_from_step": 4, "changes": {"max_steps": [4, 6]}}]


def test_non_finite_values_stop_the_run_before_the_optimizer_step(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="config: lr must be a finite number, got inf"):
        tiny_config(tmp_path, "lr=.inf")
    import lockedopd.opd.trainer as trainer_module

    original = trainer_module.rollout_opd_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the third step's loss is NaN
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_module, "rollout_opd_loss", poisoned)
    with pytest.raises(
        FloatingPointError, match="step 3: the loss .* is not finite; the optimizer step was not taken"
    ) as info:
        run(tmp_path / "nan", "save_steps=1", "eval_steps=0")
    assert any("step-000002" in note for note in getattr(info.value, "__notes__", []))
    records = read_metrics(tmp_path / "nan")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
    saved = [p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()]
    assert "step-000003" not in saved
    weights = final_weights(tmp_path / "nan", 2)
    assert all(torch.isfinite(w).all() for w in weights.values())
