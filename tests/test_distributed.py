"""More than one process: `torchrun --nproc_per_node 2 -m lockedopd distill` trains what one process trains.

Two processes on the CPU (gloo), tiny models. Bit equality with one process is out of reach for the weights: the
gradient of a 4-prompt micro-batch is summed by one backward kernel in one process and as two partial sums of 2
prompts in two, and float addition is not associative. So weights are compared at 1e-5 relative, and the basis
(the tracker's SVD of those weights) at 1e-4 absolute; the lock step and the basis file's metadata are exact. A
killed 2-process run resumes to bit-identical weights of the uninterrupted 2-process run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lockedopd.opd import OPDTrainer, load_config
from lockedopd.opd.rollout import HFStudentSampler
from lockedopd.runtime.distributed import DistContext, shard_bounds
from tests.conftest import REPO, TINY_CONFIG

pytestmark = pytest.mark.distributed
SETTINGS = ["progress=false", "save_steps=2", "max_steps=9"]  # lock at 6, 3 locked steps


def torchrun(out: Path, *overrides: str, wait: bool = True) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node 2 -m lockedopd distill tiny.yaml`` in its own process group."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lockedopd"]
    cmd += ["distill", str(TINY_CONFIG), f"output_dir={out}", *SETTINGS, *overrides]
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    if wait:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-4000:]
    return proc


def one_process(out: Path, *overrides: str) -> dict:
    return OPDTrainer.from_config(load_config(TINY_CONFIG, [f"output_dir={out}", *SETTINGS, *overrides])).train()


def checkpoint(out: Path, step: int, stem: str = "model") -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step-{step:06d}" / f"{stem}.safetensors")


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-30)) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    torchrun(two)
    return one_process(one), one, two


def test_two_processes_train_the_one_process_run(runs):
    summary_one, one, two = runs
    summary_two = json.loads((two / "summary.json").read_text())
    assert summary_two["world_size"] == 2 and summary_one["world_size"] == 1
    assert summary_two["lock_step"] == summary_one["lock_step"] == 6
    assert summary_two["lock_reason"] == summary_one["lock_reason"]
    steps = sorted(int(p.name.split("-")[1]) for p in (two / "checkpoints").iterdir())
    assert steps == [0, 2, 4, 6, 8, 9]
    for step in steps:  # warmup, the lock step and locked steps: the merged weights
        assert max_relative_difference(checkpoint(one, step), checkpoint(two, step)) < 1e-5, step
    assert max_relative_difference(checkpoint(one, 9, "coefficients"), checkpoint(two, 9, "coefficients")) < 1e-3
    b1, b2 = load_file(one / "basis.safetensors"), load_file(two / "basis.safetensors")
    assert b1.keys() == b2.keys() and len(b1) == 28
    assert max(float((b1[k] - b2[k]).abs().max()) for k in b1) < 1e-4
    with safe_open(one / "basis.safetensors", "pt") as f1, safe_open(two / "basis.safetensors", "pt") as f2:
        assert f1.metadata() == f2.metadata()  # (the file's bytes differ anyway: safetensors orders metadata freely)
    # the metrics are the whole micro-batch's (token-weighted over both processes), written once
    m1 = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == list(range(10))
    for r1, r2 in zip(m1[1:], m2[1:]):
        assert r1["tokens"] == r2["tokens"] and r1["kept_tokens"] == r2["kept_tokens"]
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4)
        assert r2["reverse_kl"] == pytest.approx(r1["reverse_kl"], rel=1e-4)
    assert summary_two["final_reverse_kl"] == pytest.approx(summary_one["final_reverse_kl"], rel=1e-4)


def test_killed_two_process_run_resumes_to_the_same_result(runs, tmp_path):
    _, _, two = runs
    out = tmp_path / "killed"
    proc = torchrun(out, wait=False)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step-000004").is_dir():  # in the warmup, before the lock
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both of its processes
        proc.wait()
    assert not (out / "checkpoints" / "step-000009").exists()
    copy = tmp_path / "resumed-by-one"
    shutil.copytree(out, copy)
    torchrun(out, "resume=true")
    for step in (6, 9):
        a, b = checkpoint(two, step), checkpoint(out, step)
        assert all(torch.equal(a[k], b[k]) for k in a), step
    b1, b2 = load_file(two / "basis.safetensors"), load_file(out / "basis.safetensors")
    assert b1.keys() == b2.keys() and all(torch.equal(b1[k], b2[k]) for k in b1)
    assert json.loads((out / "summary.json").read_text())["lock_step"] == 6
    # a 2-process run resumes under 1 process too: the step does not depend on the split
    one_process(copy, "resume=true")
    assert max_relative_difference(checkpoint(two, 9), checkpoint(copy, 9)) < 1e-5


def test_a_prompts_sample_does_not_depend_on_its_batch(tiny_student):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    sampler = HFStudentSampler(tiny_student, seed_per_row=True)
    whole = sampler.generate(prompts, 0, 1, 10, seed=100)
    first, second = (
        sampler.generate(prompts[:2], 0, 1, 10, seed=100),
        sampler.generate(prompts[2:], 0, 1, 10, seed=102),
    )
    rows = whole.sequences()
    assert rows == first.sequences() + second.sequences()
    assert len({tuple(r) for r in rows}) == 4 and sum(len(r) for r in rows) > sum(map(len, prompts))
    assert sampler.generate(prompts, 0, 1, 10, seed=101).sequences() != rows  # the seed matters


def test_shard_bounds_cover_every_item_once():
    for total in (2, 4, 5, 9):
        for world in (1, 2, 3):
            if total < world:
                continue
            parts = [shard_bounds(total, world, rank) for rank in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


def test_settings_that_cannot_be_split_are_refused(tmp_path):
    config = load_config(TINY_CONFIG, [f"output_dir={tmp_path}", "progress=false", "rollout.seeding=batch"])
    with pytest.raises(ValueError, match="rollout.seeding=prompt"):
        _trainer_with(config, DistContext(world_size=2, rank=1))
    config = load_config(TINY_CONFIG, [f"output_dir={tmp_path}", "rollout.seeding=prompt", "batch_size=2"])
    with pytest.raises(ValueError, match="raise batch_size to >= 3"):
        _trainer_with(config, DistContext(world_size=3, rank=0))
    assert not any(tmp_path.iterdir())  # refused before anything was written


def _trainer_with(config, dist):
    from lockedopd.opd.builders import build_run_inputs

    inputs = build_run_inputs(config)
    return OPDTrainer(
        config, inputs.student, inputs.tokenizer, inputs.teacher, inputs.train_prompts, inputs.eval_prompts, dist=dist
    )


def test_trl_warmup_and_locked_phase_under_two_processes(tmp_path):
    """Rank 1's stability test alone would lock at step 2 (measured: without the broadcast the 2-process run hangs,
    rank 1 stopping while rank 0 trains on); both ranks lock at the main process's step 4, carry the same moments
    and train the same coefficients (DDP)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    script = REPO / "tests" / "trl_two_process.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(cmd + [str(tmp_path)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))
    assert rank0["world_size"] == 2
    assert rank0["locked_step"] == rank1["locked_step"] == rank0["warmup_steps_run"] == 4
    assert rank0["lock_reason"] == rank1["lock_reason"] == "max_warmup_steps"
    assert rank0["carry"] == rank1["carry"] and rank0["coefficients"] == rank1["coefficients"]
    assert rank0["locked_steps_run"] == 2 and rank0["coefficient_norm"] > 0


def test_fsdp2_warmup_lock_and_locked_phase_match_the_unsharded_run(tmp_path):
    """FSDP2 on the CPU (gloo): warmup sharded by rows, the tracker and the carry gathering one matrix at a time, then
    the locked phase with frozen base and coefficients sharded and the bases whole; all equal to the unsharded run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    script = REPO / "tests" / "fsdp2_two_process.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(cmd + [str(tmp_path)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads((tmp_path / "fsdp2.json").read_text())
    assert report["world_size"] == 2
    assert all(2 * report["shard_rows"][n] == report["full_rows"][n] for n in report["full_rows"])  # half each
    assert report["weight_max_abs_change"] > 1e-3  # the warmup moved the weights ...
    assert report["weight_max_abs_diff"] <= 1e-6 * report["weight_max_abs_change"]  # ... exactly as unsharded
    assert report["basis_V_max_abs_diff"] < 1e-5 and report["lr_scales_max_rel_diff"] < 1e-5
    assert report["carry_exp_avg_max_abs_diff"] <= 1e-5 * report["carry_exp_avg_max_abs"]
    assert report["similarities"][1:] == pytest.approx(report["ref_similarities"][1:], abs=1e-9)
    assert report["frozen_sharded"] and report["bases_whole"]
    assert all(2 * report["coefficient_rows"][n] == report["full_rows"][n] for n in report["full_rows"])
    assert report["coefficient_max_abs"] > 0
    assert report["coefficient_max_abs_diff"] <= 1e-5 * report["coefficient_max_abs"]
    assert report["locked_losses"] == pytest.approx(report["ref_locked_losses"], rel=1e-6)
    assert report["locked_losses"][1] < report["locked_losses"][0]


FSDP = ["fsdp=true", "monitor.enabled=false"]  # the monitor (refused under fsdp) does not change the weights


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(out, *FSDP)
    return out


def test_fsdp_two_processes_train_the_one_process_run(runs, fsdp_run):
    """``fsdp=true``: the student sharded over 2 processes (warmup with AdamW, lock at 6, 3 locked steps with the
    default factored optimizer on row-sharded coefficients) trains what 1 unsharded process trains; the checkpoints
    are written whole, in the unsharded run's format."""
    summary_one, one, _ = runs
    summary = json.loads((fsdp_run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["lock_step"] == summary_one["lock_step"] == 6
    assert summary["lock_reason"] == summary_one["lock_reason"]
    steps = sorted(int(p.name.split("-")[1]) for p in (fsdp_run / "checkpoints").iterdir())
    assert steps == [0, 2, 4, 6, 8, 9]
    assert max_relative_difference(checkpoint(one, 6), checkpoint(one, 9)) > 1e-3  # the locked steps move W ...
    for step in steps:  # ... and the sharded run moves it the same way (measured: 6.5e-8 at most)
        assert max_relative_difference(checkpoint(one, step), checkpoint(fsdp_run, step)) < 1e-5, step
    c1, c2 = checkpoint(one, 9, "coefficients"), checkpoint(fsdp_run, 9, "coefficients")
    assert len(c1) == 14 and max_relative_difference(c1, c2) < 1e-3  # (measured 1.7e-5)
    b1, b2 = load_file(one / "basis.safetensors"), load_file(fsdp_run / "basis.safetensors")
    assert b1.keys() == b2.keys() and max(float((b1[k] - b2[k]).abs().max()) for k in b1) < 1e-4
    with safe_open(one / "basis.safetensors", "pt") as f1, safe_open(fsdp_run / "basis.safetensors", "pt") as f2:
        assert f1.metadata() == f2.metadata()
    for step in (4, 9):  # AdamW's moments in the warmup, the factored optimizer's m, R and C after the lock: whole
        o1, o2 = (torch.load(out / "checkpoints" / f"step-{step:06d}" / "optimizer.pt") for out in (one, fsdp_run))
        assert o1["param_groups"] == o2["param_groups"] and o1["state"].keys() == o2["state"].keys()
        for index, state in o1["state"].items():
            assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in o2["state"][index].items()}
            for key in state.keys() - {"step"}:
                scale = float(state[key].abs().max())
                assert float((state[key] - o2["state"][index][key]).abs().max()) <= 1e-4 * scale, (step, key)
    assert sorted(o2["state"][0]) == ["col_sq", "exp_avg", "row_sq", "step"]
    assert o2["state"][0]["row_sq"].shape == (32,) and o2["state"][0]["exp_avg"].shape == (32, 4)
    a1, a2 = (load_file(out / "adapter" / "adapter_model.safetensors") for out in (one, fsdp_run))
    assert a1.keys() == a2.keys() and max(float((a1[k] - a2[k]).abs().max()) for k in a1) < 1e-4
    metrics = [json.loads(line) for line in (fsdp_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == list(range(10)) and all(r["gather_s"] >= 0 for r in metrics[1:])
    assert summary["final_reverse_kl"] == pytest.approx(summary_one["final_reverse_kl"], rel=1e-4)


def test_fsdp_run_resumes_in_the_warmup_and_after_the_lock(fsdp_run, tmp_path):
    """Resumed from its step-4 checkpoint (warmup: shards and AdamW state loaded from whole tensors, the tracker from
    the checkpoint) and from step 8 (locked: the phase rebuilt whole, then sharded with its optimizer state), a
    2-process fsdp run ends with the uninterrupted run's bits."""
    warm, locked = tmp_path / "warmup", tmp_path / "locked"
    for out, last in ((warm, 4), (locked, 8)):
        shutil.copytree(fsdp_run, out)
        for path in (out / "checkpoints").iterdir():
            if int(path.name.split("-")[1]) > last:
                shutil.rmtree(path)
        (out / "summary.json").unlink()
    for path in warm.iterdir():  # nothing of the lock yet, as a run killed at step 5 leaves it
        if path.name not in ("checkpoints", "config.yaml", "metrics.jsonl"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    torchrun(warm, *FSDP, "resume=true")
    torchrun(locked, *FSDP, "resume=true")
    for out, steps in ((warm, (6, 9)), (locked, (9,))):
        for step in steps:
            a, b = checkpoint(fsdp_run, step), checkpoint(out, step)
            assert all(torch.equal(a[k], b[k]) for k in a), (out.name, step)
    b1, b2 = load_file(fsdp_run / "basis.safetensors"), load_file(warm / "basis.safetensors")
    assert b1.keys() == b2.keys() and all(torch.equal(b1[k], b2[k]) for k in b1)


def test_fsdp_is_refused_where_it_cannot_work(tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = load_config(TINY_CONFIG, [f"output_dir={out}", *SETTINGS, *FSDP])
    with pytest.raises(ValueError, match="but this is one process; launch several"):
        _trainer_with(config, DistContext())
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch with an FSDP config turns fsdp on
    config = load_config(TINY_CONFIG, [f"output_dir={out}", *SETTINGS, "monitor.enabled=false"])
    with pytest.raises(ValueError, match="fsdp=true shards the student over processes"):
        _trainer_with(config, DistContext())
    refused = {
        "rollout.backend=vllm": "set rollout.backend=hf",
        "optimizer=adamw8bit": "set optimizer=adamw",
        "lock.base_dtype=nf4": "set lock.base_dtype=keep",
        "lock.optimizer=projected_full": "set lock.optimizer=factored or coefficients",
        "lock.mode=two_sided": "set lock.mode=right",
        "monitor.enabled=true": "set monitor.enabled=false",
        "objective.chunk_size=8": "set objective.chunk_size=0",
    }
    for setting, fix in refused.items():
        with pytest.raises(ValueError, match=f"fsdp=true does not work with {setting}: .*{fix}, or set fsdp=false"):
            load_config(TINY_CONFIG, [f"output_dir={out}", *FSDP, setting])
    with pytest.raises(ValueError, match="fsdp must be bool"):
        load_config(TINY_CONFIG, [f"output_dir={out}", "fsdp=2"])
    assert not out.exists()  # refused before anything was written
