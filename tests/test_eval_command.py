"""``lockedopd eval``: adapters on their base, the reverse KL to a teacher, and completions from vLLM."""

from __future__ import annotations

import json

import peft
import pytest
import torch

from lockedopd.cli import main
from lockedopd.opd.accuracy import evaluate_accuracy
from lockedopd.opd.eval_target import load_eval_target
from lockedopd.opd.rollout import encode_prompts
from tests.test_vllm_teachers import tiny_pair

PROBLEMS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (30, 4), (7, 7), (12, 9), (5, 50)]]


@pytest.fixture()
def problems(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


@pytest.fixture()
def base_and_adapter(tmp_path):
    """A tiny model directory and a LoRA adapter on it (non-zero B, so the adapter changes the logits)."""
    model, tok = tiny_pair()
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    targets = ["q_proj", "v_proj", "down_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(0)
    lora = peft.get_peft_model(model, config)
    lora.peft_config["default"].base_model_name_or_path = str(base)
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    ids = torch.tensor([encode_prompts(tok, ["12+9="])[0]])
    with torch.no_grad():
        logits = lora(ids).logits
    return base, adapter, ids, logits


def test_an_adapter_is_scored_merged_on_the_base_its_config_names(base_and_adapter, problems, tmp_path):
    base, adapter, ids, logits = base_and_adapter
    target = load_eval_target(adapter)
    with torch.no_grad():
        got = target.model(ids).logits
    plain = load_eval_target(base).model
    with torch.no_grad():
        base_logits = plain(ids).logits
    assert target.kind == "adapter" and not isinstance(target.model, peft.PeftModel)
    assert (got - logits).abs().max() < 1e-5 and (base_logits - logits).abs().max() > 1e-3
    argv = ["eval", str(adapter), "--data", str(problems), "--verifier", "contains_answer", "--samples", "2",
            "--max-new-tokens", "6", "--no-chat-template"]  # fmt: skip
    assert main([*argv, "--json", str(tmp_path / "a.json")]) == 0
    assert main([*argv, "--base", str(base), "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a == {**b, "target": a["target"]} and a["kind"] == "adapter" and a["problems"] == len(PROBLEMS)


def test_a_runs_own_adapter_and_pruning_an_adapter_are_refused(base_and_adapter, tmp_path):
    base, adapter, _, _ = base_and_adapter
    with pytest.raises(ValueError, match="prune its base model"):
        load_eval_target(adapter, keep_layers=[0])
    (tmp_path / "config.yaml").write_text("seed: 0\n")  # adapter/ now sits in a run directory
    with pytest.raises(ValueError, match=r"a run's own adapter.*lockedopd eval"):
        load_eval_target(adapter)
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        load_eval_target(tmp_path / "nothing-here")


def test_reverse_kl_to_a_teacher_is_zero_against_itself_and_positive_against_another(
    base_and_adapter, problems, tmp_path
):
    base, adapter, _, _ = base_and_adapter
    argv = ["eval", str(base), "--data", str(problems), "--verifier", "contains_answer", "--samples", "0",
            "--max-new-tokens", "6", "--no-chat-template", "--kl-size", "3"]  # fmt: skip
    assert main([*argv, "--teacher", str(base), "--json", str(tmp_path / "self.json")]) == 0
    assert main([*argv, "--teacher", str(adapter.parent / "merged"), "--json", str(tmp_path / "other.json")]) != 0
    load_eval_target(adapter).model.save_pretrained(tmp_path / "merged")
    load_eval_target(base).tokenizer.save_pretrained(tmp_path / "merged")
    assert main([*argv, "--teacher", str(tmp_path / "merged"), "--markdown", str(tmp_path / "kl.md"),
                 "--json", str(tmp_path / "other.json")]) == 0  # fmt: skip
    own, other = (json.loads((tmp_path / n).read_text()) for n in ("self.json", "other.json"))
    assert abs(own["reverse_kl"]) < 1e-5 and own["kl_prompts"] == 3 and own["kl_tokens"] > 0
    assert other["reverse_kl"] > 1e-3
    table = (tmp_path / "kl.md").read_text().splitlines()
    assert table[0].endswith(f"| reverse KL to {tmp_path / 'merged'} |")
    assert table[2].endswith(f"| {other['reverse_kl']:.4f} |")


@pytest.mark.vllm
def test_vllm_writes_the_greedy_completions_transformers_writes_and_samples_reproducibly(tmp_path):
    pytest.importorskip("vllm")
    from lockedopd.opd.vllm_generation import VLLMTextGenerator

    model, tok = tiny_pair()
    prompts = encode_prompts(tok, [p["prompt"] for p in PROBLEMS], use_chat_template=False)
    answers = [p["answer"] for p in PROBLEMS]
    written: list[list[str]] = []

    def recorder(texts, refs):
        written.append(list(texts))
        return [1.0 if t.startswith(texts[0][:1]) else 0.0 for t in texts]

    hf = evaluate_accuracy(model, tok, prompts, answers, recorder, 10, samples=0)
    generator = VLLMTextGenerator(model, tok)
    try:
        first = evaluate_accuracy(None, tok, prompts, answers, recorder, 10, samples=2, seed=3, generator=generator)
        again = evaluate_accuracy(None, tok, prompts, answers, recorder, 10, samples=2, seed=3, generator=generator)
    finally:
        generator.close()
    hf_greedy, vllm_greedy, vllm_sampled, vllm_greedy_again, vllm_sampled_again = written
    assert vllm_greedy == hf_greedy and vllm_greedy_again == vllm_greedy
    assert vllm_sampled_again == vllm_sampled and vllm_sampled[: len(PROBLEMS)] != vllm_greedy
    assert first.greedy == again.greedy == hf.greedy and first.sampled == again.sampled
    assert first.mean_completion_tokens == pytest.approx(hf.mean_completion_tokens)
