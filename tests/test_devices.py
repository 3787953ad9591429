"""``device``: the CPU by default, ``auto`` falls back to it, ``cuda`` without a GPU fails before anything is
written (the GPU path itself is exercised by scripts/gpu_smoke.sh where a GPU is present)."""

from __future__ import annotations

import pytest
import torch

from lockedopd.opd import OPDTrainer, load_config
from lockedopd.runtime.devices import resolve_device
from tests.conftest import TINY_CONFIG


def test_auto_is_the_cpu_without_a_gpu_and_unknown_names_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="not one of"):
        resolve_device("tpu")


def test_cuda_picks_the_gpu_of_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "6")
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)


def test_cuda_without_a_gpu_fails_before_the_run_directory_exists(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = load_config(TINY_CONFIG, [f"output_dir={tmp_path / 'run'}", "device=cuda", "progress=false"])
    with pytest.raises(ValueError, match="device=cuda, but torch sees no CUDA GPU.*set device=cpu"):
        OPDTrainer.from_config(config)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="device"):
        load_config(TINY_CONFIG, ["device=gpu"])


def test_the_gpu_smoke_script_says_there_is_no_gpu_here_and_passes():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: run scripts/gpu_smoke.sh itself")
    script, env = str(root / "scripts" / "gpu_smoke.sh"), {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("gpu_smoke: no CUDA GPU here"), out.stdout + out.stderr


def test_the_gpu_recipe_names_models_and_data_the_way_users_do():
    from lockedopd.runtime.hub import is_hub_id

    config = load_config(TINY_CONFIG.parent / "qwen3_8b_from_32b.yaml")
    assert config.device == "cuda" and is_hub_id(config.student.source) and is_hub_id(config.teacher.model.source)
    assert is_hub_id(config.data.train_path) and config.data.prompt_field == "question"
    assert config.accuracy.verifier == "math" and config.accuracy.path == "HuggingFaceH4/MATH-500"
