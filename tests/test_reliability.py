"""Nothing lost, nothing silent: atomic writes and their recovery, torn logs, validation before anything is written,
the CLI's one error boundary, a hardened server client, and real SIGKILLs of a CLI run across a lock and a relock."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lockedopd.cli import main
from lockedopd.opd import OPDTrainer, load_config
from lockedopd.opd.run_checkpoint import MetricsLog
from lockedopd.runtime.atomic_io import atomic_directory, atomic_file, recover_interrupted_writes, replace_directory
from lockedopd.runtime.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from lockedopd.teachers.vllm_server import (
    VLLMServerError,
    VLLMServerTeacher,
    check_server_url,
    parse_prompt_logprobs,
)
from tests.conftest import REPO, TINY_CONFIG

TIMING_KEYS = {"step_time_s", "rollout_s", "score_s", "sync_s", "eval_time_s"}


# ------------------------------------------------------------------------------------------- atomic writes
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_directory_is_replaced_only_once_its_replacement_is_complete(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "weights").write_text("v1")
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "weights").write_text("v2-partial")
        raise RuntimeError("killed while writing")
    assert (final / "weights").read_text() == "v1"
    with atomic_directory(final) as tmp:
        (tmp / "weights").write_text("v2")
    assert (final / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_recovery_puts_back_a_directory_whose_replacement_never_arrived(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    # a kill between "set the old step-4 aside" and "rename the new one in": only .old-step-000004 exists
    save_checkpoint(tmp_path, 4, {"model": {"w": torch.ones(2)}}, {}, {"step": 4})
    os.replace(ckpts / "step-000004", ckpts / ".old-step-000004")
    (ckpts / ".tmp-step-000004-abc").mkdir()  # the half-written replacement
    (tmp_path / ".tmp-metrics.jsonl-xyz").write_text("partial")
    # a kill after the rename: the set-aside copy of step 2 is left beside the complete new step 2
    save_checkpoint(tmp_path, 2, {"model": {"w": torch.zeros(2)}}, {}, {"step": 2})
    (ckpts / ".old-step-000002").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    actions = recover_interrupted_writes(tmp_path)
    assert len(actions) == 4
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    assert torch.equal(load_checkpoint(ckpts / "step-000004")[0]["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000004"]
    assert not (tmp_path / ".tmp-metrics.jsonl-xyz").exists()


def test_replace_directory_overwrites_an_existing_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 3, {"model": {"w": torch.zeros(3)}}, {}, {"step": 3})
    save_checkpoint(tmp_path, 3, {"model": {"w": torch.full((3,), 7.0)}}, {}, {"step": 3})
    tensors, _, state = load_checkpoint(tmp_path / "checkpoints" / "step-000003")
    assert torch.equal(tensors["model"]["w"], torch.full((3,), 7.0)) and state == {"step": 3}
    new = tmp_path / "new"
    new.mkdir()
    (new / "f").write_text("x")
    replace_directory(new, tmp_path / "checkpoints")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["f"]


# ------------------------------------------------------------------------------------------------ metrics
def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / (s + 1)}) for s in range(4)]
    path.write_text("".join(row + "\n" for row in rows) + '{"step": 4, "lo')  # killed mid-append
    log = MetricsLog(path, resume_step=3)
    assert [r["step"] for r in log.read()] == [0, 1, 2, 3]
    log.write({"step": 4, "loss": 0.2})
    assert [r["step"] for r in log.read()] == [0, 1, 2, 3, 4]
    assert MetricsLog(path, resume_step=2).read()[-1]["step"] == 2  # rows after the resumed step are recomputed


def test_a_damaged_metrics_line_before_the_last_is_refused(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, [json.dumps({"step": 0}), "garbage", json.dumps({"step": 2})])
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not JSON"):
        MetricsLog(path, resume_step=2)


# ------------------------------------------------------------------------------ validation before writing
def _config(out, *overrides):
    return load_config(TINY_CONFIG, [f"output_dir={out}", "progress=false", *overrides])


def test_a_rank_larger_than_a_target_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"rank 40 \(lock.rank\) is larger than .* set the rank <= 32"):
        OPDTrainer.from_config(_config(out, "lock.rank=40"))
    assert not out.exists()


def test_a_basis_covering_only_some_targets_is_refused_before_anything_is_written(tmp_path):
    first = tmp_path / "first"
    OPDTrainer.from_config(_config(first, "max_steps=3", "lock.at_step=2", "eval_steps=0")).train()
    full = load_file(first / "basis.safetensors")
    partial = {k: v for k, v in full.items() if "layers.0." in k}
    assert 0 < len(partial) < len(full)
    save_file(partial, tmp_path / "partial.safetensors", metadata={"rank": "4", "mode": "right"})
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"no basis for 7 of the 14 target matrices \(e.g. model.layers.1"):
        OPDTrainer.from_config(_config(out, f"lock.basis_path={tmp_path / 'partial.safetensors'}"))
    with pytest.raises(ValueError, match=r"has rank \[4\] but lock.rank=2; set lock.rank=4"):
        OPDTrainer.from_config(_config(out, f"lock.basis_path={first / 'basis.safetensors'}", "lock.rank=2"))
    with pytest.raises(FileNotFoundError, match="lock.basis_path .* does not exist"):
        OPDTrainer.from_config(_config(out, f"lock.basis_path={tmp_path / 'none.safetensors'}"))
    assert not out.exists()


def test_a_binary_prompts_file_is_named(tmp_path):
    binary = tmp_path / "prompts.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match=rf"prompt file {binary} is not UTF-8 text"):
        OPDTrainer.from_config(_config(tmp_path / "run", f"data.train_path={binary}"))


# ------------------------------------------------------------------------------------- the error boundary
def test_every_cli_failure_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    assert main(["distill", str(TINY_CONFIG), f"output_dir={tmp_path / 'a'}", "lock.rank=40"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "set the rank <= 32" in err and "Traceback" not in err

    def explode(config):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr(OPDTrainer, "from_config", staticmethod(explode))
    assert main(["distill", str(TINY_CONFIG), f"output_dir={tmp_path / 'b'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "error: AttributeError: 'NoneType' object has no attribute 'shape'" in err and "--debug" in err
    assert main(["--debug", "distill", str(TINY_CONFIG), f"output_dir={tmp_path / 'b'}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in explode" in err

    def os_failure(config):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(OPDTrainer, "from_config", staticmethod(os_failure))
    assert main(["distill", str(TINY_CONFIG)]) == 2
    assert "error: OSError: [Errno 28] No space left on device" in capsys.readouterr().err


def test_diagnose_refuses_checkpoints_that_share_no_tensor(tmp_path, capsys):
    save_file({"a.weight": torch.ones(4, 4)}, tmp_path / "base.safetensors")
    save_file({"b.weight": torch.ones(4, 4)}, tmp_path / "ft.safetensors")
    out = tmp_path / "report.json"
    code = main(["diagnose", str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"), "--json", str(out)])
    assert code == 2
    assert "share no tensor of equal name and shape" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------------------- the server client
class ScriptedServer:
    """A loopback HTTP server that answers every GET/POST with one canned (status, body)."""

    def __init__(self, status: int, body: bytes):
        handler_status, handler_body = status, body

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                if self.command == "POST":
                    self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(handler_status)
                self.send_header("Content-Length", str(len(handler_body)))
                self.end_headers()
                self.wfile.write(handler_body)

            do_GET = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_server_url_must_be_http():
    for bad in ("file:///etc/passwd", "ftp://host/x", "127.0.0.1:8000", "http://"):
        with pytest.raises(ValueError, match="is not an http\\(s\\) URL with a host"):
            check_server_url(bad)
    assert check_server_url("https://teacher.internal:8443/") == "https://teacher.internal:8443"
    with pytest.raises(ValueError, match="not an http"):
        load_config(TINY_CONFIG, ["teacher.backend=vllm_server", "teacher.server_url=file:///etc/passwd"])


def test_a_server_that_is_not_vllm_gets_one_clear_error():
    with ScriptedServer(404, b"<html>Not Found</html>") as server:
        with pytest.raises(VLLMServerError, match=r"is not a vLLM OpenAI server .*HTTP 404"):
            VLLMServerTeacher(server.url, max_retries=0)


def test_an_oversized_answer_is_refused():
    with ScriptedServer(200, b'{"data": [' + b" " * 5000 + b"]}") as server:
        with pytest.raises(VLLMServerError, match="more than 4096 bytes"):
            VLLMServerTeacher(server.url, max_retries=0, max_response_bytes=4096)


def test_non_finite_or_positive_server_logprobs_are_refused():
    for bad in (float("nan"), math.inf, 0.5):
        with pytest.raises(VLLMServerError, match="a log-probability is finite and <= 0"):
            parse_prompt_logprobs([None, {"5": {"logprob": bad, "rank": 1}}])
    with pytest.raises(VLLMServerError, match="unreadable prompt_logprobs entry"):
        parse_prompt_logprobs([None, {"5": {"rank": 1}}])
    assert parse_prompt_logprobs([None, {"5": {"logprob": -9999.0}}])[1][5][0] == -math.inf


# ------------------------------------------------------------------------------------ SIGKILL, lock, relock
RELOCK = ["max_steps=16", "save_steps=1", "eval_steps=4", "monitor.on_drift=relock", "monitor.capture_threshold=0.99",
          "monitor.patience=1", "progress=false", "resume=true"]  # fmt: skip


def _launch(out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "lockedopd", "distill", str(TINY_CONFIG), f"output_dir={out}", *RELOCK]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_at_random_points_across_a_lock_and_a_relock_resumes_to_the_same_run(tmp_path):
    reference = tmp_path / "reference"
    proc = _launch(reference)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()
    events = json.loads((reference / "summary.json").read_text())["lock_events"]
    assert [e["event"] for e in events[:3]] == ["lock", "relock-start", "lock"]
    first_lock, relock = events[0]["step"], events[2]["step"]

    out, rng = tmp_path / "killed", random.Random(20261130)
    # kill once the log holds this many rows (row k+1 = step k done), then after a random delay within a step or two:
    # in the warmup, right after the lock, after the relock started, right after the second lock
    targets = [3, first_lock + 2, events[1]["step"] + 3, relock + 2]
    killed_while_running = 0
    for rows in targets:
        proc = _launch(out)
        while _rows(out) < rows and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.15))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed_while_running += 1
        proc.wait(timeout=60)  # a kill may also land after the last step, while the reports are written
    assert killed_while_running >= 3
    proc = _launch(out)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()

    a = load_file(reference / "checkpoints" / "step-000016" / "model.safetensors")
    b = load_file(out / "checkpoints" / "step-000016" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-12))
                for k in a)  # fmt: skip
    assert worst <= 1e-6, worst
    ref_rows, rows = _records(reference), _records(out)
    assert [r["step"] for r in rows] == list(range(17)), "duplicated or missing metrics rows"
    for x, y in zip(ref_rows, rows, strict=True):
        assert x.keys() == y.keys(), x["step"]
        for key in x.keys() - TIMING_KEYS:  # the tracker's similarities are re-summed after a resume: 1e-16 apart
            same = math.isclose(x[key], y[key], rel_tol=1e-9) if isinstance(x[key], float) else x[key] == y[key]
            assert same, (x["step"], key, x[key], y[key])
    assert not [p for p in out.rglob("*") if p.name.startswith((".tmp-", ".old-"))]
