"""Activation checkpointing (gradient_checkpointing: true): same loss and gradients, fewer saved bytes, both phases."""

from __future__ import annotations

import json

import peft
import pytest
import torch

from lockedopd import SubspaceLockedConfig
from lockedopd.diagnostics.memory import SavedTensorBytes
from lockedopd.models import build_tiny_llama
from lockedopd.opd.chunked_loss import rollout_opd_loss
from lockedopd.opd.config import ObjectiveConfig
from lockedopd.opd.rollout import rollout_from_completions
from lockedopd.runtime.activation_checkpointing import (
    activation_checkpointing_enabled,
    enable_activation_checkpointing,
)
from lockedopd.subspace.basis_io import save_basis
from lockedopd.teachers import HFTeacher

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB, BATCH, COMPLETION = 64, 4, 24


def student(checkpointing: bool, basis_path=None):
    model = build_tiny_llama(VOCAB, num_layers=2, hidden_size=32, intermediate_size=128, seed=0)
    if basis_path is not None:  # the locked phase: frozen base, trainable coefficients (seeded random init)
        torch.manual_seed(0)
        model = peft.get_peft_model(
            model, SubspaceLockedConfig(r=4, target_modules=TARGETS, basis_path=str(basis_path), init_scale=0.1)
        )
    if checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    completions = [torch.randint(3, VOCAB, (COMPLETION,), generator=generator).tolist() for _ in range(BATCH)]
    rollout = rollout_from_completions([[1, 2, 3, 4]] * BATCH, completions, None, 0, None)
    teacher = HFTeacher(build_tiny_llama(VOCAB, num_layers=2, seed=1))
    return rollout, teacher.score(rollout.sequences(), rollout.prompt_lengths, full_logprobs=True)


@pytest.fixture(scope="module")
def basis_path(tmp_path_factory):
    generator = torch.Generator().manual_seed(0)
    model = build_tiny_llama(VOCAB, num_layers=2, hidden_size=32, intermediate_size=128, seed=0)
    bases = {
        name: tuple(
            torch.linalg.qr(torch.randn(n, 4, generator=generator, dtype=torch.float64))[0].float().contiguous()
            for n in (module.out_features, module.in_features)
        )
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in TARGETS
    }
    path = tmp_path_factory.mktemp("basis") / "basis.safetensors"
    save_basis(path, bases, {"step": 1})
    return path


def step(model, batch):
    rollout, scores = batch
    model.zero_grad(set_to_none=True)
    trained = [p for p in model.parameters() if p.requires_grad]
    with SavedTensorBytes(exclude=model.parameters()) as saved:
        out = rollout_opd_loss(model, rollout, scores, ObjectiveConfig(name="reverse_kl"))
    out.loss.backward()
    return float(out.loss.detach()), [p.grad.clone() for p in trained], saved.bytes


@pytest.mark.parametrize("phase", ["warmup", "locked"])
def test_checkpointing_gives_the_same_loss_and_gradients_with_fewer_saved_bytes(batch, basis_path, phase):
    path = basis_path if phase == "locked" else None
    loss, grads, saved = step(student(False, path), batch)
    model = student(True, path)
    assert activation_checkpointing_enabled(model)
    ckpt_loss, ckpt_grads, ckpt_saved = step(model, batch)
    assert ckpt_loss == pytest.approx(loss, abs=1e-5)
    assert len(grads) == len(ckpt_grads) == (14 if phase == "locked" else len(list(model.parameters())))
    for plain, recomputed in zip(grads, ckpt_grads):
        assert recomputed.abs().max() > 0  # the frozen embeddings do not cut the gradient off (locked phase)
        assert torch.allclose(recomputed, plain, atol=1e-5, rtol=1e-5)
    # each layer keeps only its input (B x L x 32 floats) instead of its attention and 128-wide MLP intermediates
    layer_input = BATCH * (4 + COMPLETION) * 32 * 4
    assert saved - ckpt_saved > 10 * 2 * layer_input, (saved, ckpt_saved)


def test_training_with_memory_options_follows_the_plain_run_through_the_lock(tmp_path):
    """The tiny recipe through warmup and lock: chunked loss and checkpointing log the same steps as plain runs."""
    from lockedopd.opd import OPDTrainer, load_config
    from tests.conftest import TINY_CONFIG

    variants = {
        "plain": [],
        "chunked_checkpointed": ["objective.chunk_size=5", "gradient_checkpointing=true"],
    }
    runs = {}
    for name, extra in variants.items():
        out = tmp_path / name
        overrides = [f"output_dir={out}", "progress=false", "max_steps=4", "eval_steps=100", "save_steps=0"]
        overrides += ["lock.min_warmup_steps=2", "lock.max_warmup_steps=2", "data.eval_size=4", *extra]
        trainer = OPDTrainer.from_config(load_config(TINY_CONFIG, overrides))
        summary = trainer.train()
        if name != "plain":
            assert trainer.phase == "locked" and activation_checkpointing_enabled(trainer.model)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (summary, records)
    (summary, records), (other, other_records) = runs["plain"], runs["chunked_checkpointed"]
    assert other["lock_step"] == summary["lock_step"] == 2
    assert [r["phase"] for r in other_records] == [r["phase"] for r in records]
    for ref, got in zip(records[1:], other_records[1:]):
        for key in ("loss", "reverse_kl", "exact_reverse_kl", "grad_norm"):
            assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (ref["step"], key)
        assert got["tokens"] == ref["tokens"]
    assert other["final_reverse_kl"] == pytest.approx(summary["final_reverse_kl"], rel=1e-4)
