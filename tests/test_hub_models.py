"""Models by hub id: a cached snapshot loads by its name offline; a missing one fails in one line."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import constants

from lockedopd.opd.builders import build_model
from lockedopd.opd.config import ModelConfig
from lockedopd.runtime.hub import is_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
    """An empty HF cache with the hub switched off (as HF_HUB_OFFLINE=1 does)."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def save_in_cache_layout(cache, repo_id, tiny_student, tiny_tokenizer, commit=COMMIT):
    """What `huggingface-cli download` leaves: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    tiny_student.save_pretrained(snapshot)
    tiny_tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_a_cached_hub_model_loads_by_its_id_offline(offline_cache, tiny_student, tiny_tokenizer):
    save_in_cache_layout(offline_cache, "tiny-org/tiny-student", tiny_student, tiny_tokenizer)
    model, tokenizer = build_model(ModelConfig(source="tiny-org/tiny-student"))
    ids = torch.tensor([tokenizer.encode("hello")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_student(ids).logits)
    assert len(tokenizer) == len(tiny_tokenizer)
    # a revision names the snapshot too
    model, _ = build_model(ModelConfig(source="tiny-org/tiny-student", revision=COMMIT))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny_student.parameters())


def test_an_unknown_hub_id_fails_with_one_line_naming_the_fix(offline_cache):
    with pytest.raises(FileNotFoundError) as caught:
        build_model(ModelConfig(source="nobody/no-such-model"))
    message = str(caught.value)
    assert "'nobody/no-such-model'" in message and "HF_HUB_OFFLINE=1" in message
    assert "local model directory" in message and "\n" not in message


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    assert is_hub_id("Qwen/Qwen3-0.6B") and is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_hub_id("tiny") and not is_hub_id("/abs/path") and not is_hub_id("a/b/c")
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("owner/name")  # an existing local path is a directory, not a hub id


def test_teacher_and_student_tokenizers_must_match_and_the_error_names_the_difference():
    from lockedopd.models import build_tiny_tokenizer
    from lockedopd.opd.builders import check_tokenizers_match

    student = build_tiny_tokenizer()
    check_tokenizers_match(student, build_tiny_tokenizer())  # the same tokenizer passes
    extra = build_tiny_tokenizer()
    extra.add_tokens(["<extra>"])
    differs = r"\(103 vs 104 tokens; only the student's: \[\], only the teacher's: \['<extra>'\]"
    with pytest.raises(ValueError, match=differs):
        check_tokenizers_match(student, extra)
    other_end = build_tiny_tokenizer()
    other_end.eos_token = "<pad>"
    with pytest.raises(ValueError, match=r"not their eos_token \('<eos>' vs '<pad>'\)"):
        check_tokenizers_match(student, other_end)


def test_a_hub_teacher_with_another_tokenizer_is_refused_before_it_loads(offline_cache, tmp_path, tiny_student):
    from lockedopd.models import build_tiny_tokenizer
    from lockedopd.opd.builders import build_run_inputs
    from lockedopd.opd.config import load_config
    from tests.conftest import TINY_CONFIG

    other = build_tiny_tokenizer()
    other.add_tokens(["<tool>"])
    save_in_cache_layout(offline_cache, "tiny-org/other-teacher", tiny_student, other)
    config = load_config(TINY_CONFIG, [f"output_dir={tmp_path}", "teacher.model.source=tiny-org/other-teacher"])
    with pytest.raises(ValueError, match=r"teacher and student tokenizers differ .*only the teacher's: \['<tool>'\]"):
        build_run_inputs(config)
