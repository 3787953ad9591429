"""Real-model checks on the embedded SmolLM2-135M-Instruct (marked real_model: slower)."""

import json

import pytest
import torch

from lockedopd.models import layers_to_keep, load_smollm2, prune_layers
from lockedopd.opd import OPDTrainer, load_config
from lockedopd.subspace import load_basis
from lockedopd.teachers import HFTeacher
from tests.conftest import REPO, requires_smollm2

pytestmark = [pytest.mark.real_model, requires_smollm2]
RECIPE = REPO / "recipes" / "configs" / "smollm2_pruned.yaml"


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


def test_embedded_model_loads_and_prunes(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152 == len(tokenizer)
    keep = layers_to_keep(30, 3)
    assert len(keep) == 20 and 2 not in keep and 29 not in keep and 0 in keep
    student, _ = load_smollm2()
    prune_layers(student, keep)
    assert len(student.model.layers) == 20
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == list(range(20))
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(student(ids).logits).all()


def test_teacher_scores_its_own_greedy_text_as_top1(smollm2):
    model, tokenizer = smollm2
    teacher = HFTeacher(model)
    prompt = tokenizer("Water boils at", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    scores = teacher.score([out[0].tolist()], [prompt.shape[1]], top_k=3)
    assert scores.mask.sum() == 6
    # greedy tokens are the teacher's argmax: sampled log-prob == top-1 log-prob
    assert torch.allclose(scores.token_logprobs[0], scores.topk_logprobs[0, :, 0], atol=1e-5)
    assert torch.equal(out[0, prompt.shape[1] :], scores.topk_ids[0, :, 0])


def test_recipe_runs_warmup_then_lock(tmp_path):
    config = load_config(
        RECIPE,
        [
            f"output_dir={tmp_path}",
            "progress=false",
            "max_steps=3",
            "batch_size=2",
            "rollout.max_new_tokens=8",
            "data.eval_size=2",
            "eval_steps=0",
            "save_steps=0",
            "lock.at_step=2",
            "lock.rank=4",
            "monitor.every=1",
        ],
    )
    summary = OPDTrainer.from_config(config).train()
    assert summary["lock_step"] == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records[1:]] == ["warmup", "warmup", "locked"]
    bases, meta = load_basis(tmp_path / "basis.safetensors")
    assert len(bases) == 20 * 7 and meta["rank"] == "4"
    U, V = bases["model.layers.0.mlp.down_proj"]
    assert V.shape == (1536, 4) and U.shape == (576, 4)
    # locked phase trains out x r per matrix: 20 layers x (q,k,v,o,gate,up,down) with r = 4
    per_layer = 4 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576)
    assert records[-1]["trainable_params"] == 20 * per_layer
    assert records[1]["trainable_params"] == 20 * (576 * 576 * 2 + 192 * 576 * 2 + 3 * 576 * 1536)
    assert 0.0 < records[-1]["monitor_captured_energy"] <= 1.0
    assert summary["final_reverse_kl"] > 0
