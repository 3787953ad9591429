"""Provenance: a digest of a model's weights, the package versions, and a grid report that says when its cells were
computed on different builds of one built model (the same recipe trained in another environment)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lockedopd.bench.quality_markdown import differing_builds_section
from lockedopd.bench.quality_report import built_model_builds
from lockedopd.opd.built_models import built_model_identity
from lockedopd.runtime.provenance import package_versions, weights_digest


def test_the_weights_digest_follows_every_byte_and_the_file_names(tmp_path):
    save_file({"w": torch.arange(6, dtype=torch.float32)}, tmp_path / "model.safetensors")
    first = weights_digest(tmp_path)
    assert len(first) == 16 and weights_digest(tmp_path) == first
    (tmp_path / "config.json").write_text("{}")  # only the weights count
    assert weights_digest(tmp_path) == first
    save_file({"w": torch.arange(6, dtype=torch.float32) + 1e-7}, tmp_path / "model.safetensors")
    assert weights_digest(tmp_path) != first
    (tmp_path / "model.safetensors").rename(tmp_path / "model-00001.safetensors")
    assert weights_digest(tmp_path) != first
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        weights_digest(tmp_path / "config.json")


def test_package_versions_name_the_installed_versions():
    versions = package_versions(("torch", "no-such-package-xyz"))
    assert versions["torch"] == torch.__version__ and versions["no-such-package-xyz"] is None
    assert versions["python"].count(".") == 2


def test_a_model_built_before_builds_recorded_digests_is_digested_from_its_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCKEDOPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher.yaml").write_text("max_steps: 3\nstudent: {source: tiny}\nlock: {enabled: false}\n")
    from lockedopd.opd.built_models import built_dir

    directory = built_dir("teacher.yaml")
    directory.mkdir(parents=True)
    save_file({"w": torch.ones(3)}, directory / "model.safetensors")
    (directory / "build.json").write_text(json.dumps({"format": 1, "key": directory.name.rsplit("-", 1)[1]}))
    identity = built_model_identity("built:teacher.yaml")
    assert identity == {"key": directory.name.rsplit("-", 1)[1], "weights_sha256": weights_digest(directory)}


def test_a_report_names_the_cells_computed_on_another_build_of_a_model():
    teacher, anchor = "built:teacher.yaml", "built:anchor.yaml"
    old, new = {"key": "k1", "weights_sha256": "aaaa"}, {"key": "k1", "weights_sha256": "bbbb"}
    cells = {
        "opd": {0: {"built_models": {teacher: old}}, 1: {}, 2: {"built_models": {teacher: new}}},
        "rlvr": {2: {"built_models": {teacher: new, anchor: {"key": "k2", "weights_sha256": "cccc"}}}},
    }
    builds = built_model_builds(cells)
    assert builds == {teacher: {"aaaa": ["opd/seed0"], "bbbb": ["opd/seed2", "rlvr/seed2"]},
                      anchor: {"cccc": ["rlvr/seed2"]}}  # fmt: skip
    lines = differing_builds_section(builds)
    assert lines[1] == "## Cells on different builds of one model"
    assert lines[3:] == ["- `built:teacher.yaml`: weights aaaa: opd/seed0; weights bbbb: opd/seed2, rlvr/seed2"]
    one_build = built_model_builds({"opd": {0: {"built_models": {teacher: new}}, 2: {"built_models": {teacher: new}}}})
    assert differing_builds_section(one_build) == []


def test_a_cell_records_the_built_models_its_student_and_teacher_come_from(monkeypatch):
    from types import SimpleNamespace

    from lockedopd.bench import cells

    monkeypatch.setattr(cells, "built_model_identity", lambda source: {"key": "k", "weights_sha256": source[-6:]})
    config = SimpleNamespace(
        student=SimpleNamespace(source="built:anchor.yaml"),
        teacher=SimpleNamespace(model=SimpleNamespace(source="built:teacher.yaml")),
    )
    assert cells.used_built_models(config) == {
        "built:anchor.yaml": {"key": "k", "weights_sha256": "r.yaml"},
        "built:teacher.yaml": {"key": "k", "weights_sha256": "r.yaml"},
    }
    config.student.source = "smollm2"
    assert list(cells.used_built_models(config)) == ["built:teacher.yaml"]
