"""Held-out evaluation: averaging over sampling seeds, and KL on the teacher's fixed greedy text."""

from __future__ import annotations

import json

import pytest
import torch

from lockedopd.opd import OPDTrainer, load_config
from lockedopd.opd.evaluation import (
    FixedText,
    evaluate_fixed_text_kl,
    evaluate_reverse_kl,
    evaluate_reverse_kl_seeds,
    load_or_make_fixed_text,
    teacher_greedy_completions,
)
from lockedopd.opd.rollout import encode_prompts, generate_rollout
from lockedopd.opd.seeds import EVAL_SEED_OFFSET, step_seed
from lockedopd.teachers.hf import HFTeacher
from tests.conftest import TINY_CONFIG

PROMPTS = ["abc", "hello there", "xyz xyz", "the cat", "q", "tiny model"]


def _ids(tokenizer):
    return encode_prompts(tokenizer, PROMPTS, use_chat_template=False)


def _args(student, teacher, tokenizer):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return (student, teacher, _ids(tokenizer), pad, tokenizer.eos_token_id, 10, 4)


def test_mean_of_two_seeds_is_the_mean_of_two_single_seed_evaluations(
    tiny_student, tiny_teacher_model, tiny_tokenizer
):
    args = _args(tiny_student, HFTeacher(tiny_teacher_model), tiny_tokenizer)
    one = evaluate_reverse_kl(*args, seed=11)
    two = evaluate_reverse_kl(*args, seed=12)
    assert one.reverse_kl != pytest.approx(two.reverse_kl, abs=1e-6)  # the seeds sample different text
    both = evaluate_reverse_kl_seeds(*args, seeds=[11, 12])
    assert both.reverse_kl == pytest.approx((one.reverse_kl + two.reverse_kl) / 2, rel=1e-6)
    assert both.sampled_reverse_kl == pytest.approx((one.sampled_reverse_kl + two.sampled_reverse_kl) / 2, rel=1e-6)
    assert both.reverse_kl_per_seed == pytest.approx([one.reverse_kl, two.reverse_kl], rel=1e-6)
    assert both.tokens == one.tokens + two.tokens
    single = evaluate_reverse_kl_seeds(*args, seeds=[11])
    assert single.reverse_kl == pytest.approx(one.reverse_kl, rel=1e-6) and single.reverse_kl_per_seed is None


def test_extra_sampling_seeds_leave_the_global_rng_as_one_seed_does(tiny_student, tiny_teacher_model, tiny_tokenizer):
    args = _args(tiny_student, HFTeacher(tiny_teacher_model), tiny_tokenizer)
    evaluate_reverse_kl_seeds(*args, seeds=[5])
    after_one = torch.get_rng_state()
    evaluate_reverse_kl_seeds(*args, seeds=[5, 6, 7])
    assert torch.equal(torch.get_rng_state(), after_one)


def _trainer_run(out, *overrides):
    config = load_config(
        TINY_CONFIG, [f"output_dir={out}", "progress=false", "max_steps=4", "eval_steps=2", *overrides]
    )
    trainer = OPDTrainer.from_config(config)
    trainer.train()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return trainer, [r for r in records if "eval_reverse_kl" in r]


def test_trainer_averages_seeds_and_keeps_seed_zero_and_training_unchanged(tmp_path):
    _, single = _trainer_run(tmp_path / "one")
    trainer, double = _trainer_run(tmp_path / "two", "eval_sampling_seeds=2")
    assert [r["step"] for r in double] == [0, 2, 4]
    for a, b in zip(single, double):
        # seed 0 of every evaluation is the single-seed run's (so the training trajectory is unchanged too) ...
        assert b["eval_reverse_kl_per_seed"][0] == pytest.approx(a["eval_reverse_kl"], rel=1e-6)
        # ... and the reported KL is the mean over both seeds
        assert b["eval_reverse_kl"] == pytest.approx(sum(b["eval_reverse_kl_per_seed"]) / 2, rel=1e-9)
        assert b["eval_reverse_kl_per_seed"][1] != pytest.approx(a["eval_reverse_kl"], abs=1e-6)
    # seed i is step_seed(seed + EVAL_SEED_OFFSET, i): evaluating the final student by hand gives the logged value
    c = trainer.config
    eval_ids = trainer.evaluator.eval_ids
    args = (trainer.model, trainer.eval_teacher, eval_ids, trainer.pad_token_id, trainer.eos_token_id)
    seed1 = evaluate_reverse_kl(
        *args, c.rollout.max_new_tokens, c.batch_size, seed=step_seed(c.seed + EVAL_SEED_OFFSET, 1)
    )
    assert seed1.reverse_kl == pytest.approx(double[-1]["eval_reverse_kl_per_seed"][1], rel=1e-5)


def test_teacher_greedy_completions_match_greedy_generate(tiny_teacher_model, tiny_tokenizer):
    ids = _ids(tiny_tokenizer)
    pad, eos = tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id
    got = teacher_greedy_completions(HFTeacher(tiny_teacher_model), ids, eos, max_new_tokens=9, batch_size=4)
    for prompt, completion in zip(ids, got):
        ref = generate_rollout(tiny_teacher_model, [prompt], pad, eos, 9, do_sample=False)
        assert completion == ref.completion_ids[0][ref.completion_mask[0]].tolist()
        assert 1 <= len(completion) <= 9


def _manual_fixed_text_kl(student, teacher, fixed):
    """Each sequence alone, unpadded: KL(student || teacher) at the completion positions, token-weighted."""
    rev = fwd = nll = 0.0
    tokens = 0
    for prompt, completion in zip(fixed.prompt_ids, fixed.completion_ids):
        seq = torch.tensor([prompt + completion])
        s = torch.log_softmax(student(seq).logits[0, len(prompt) - 1 : -1].float(), -1)
        t = torch.log_softmax(teacher(seq).logits[0, len(prompt) - 1 : -1].float(), -1)
        rev += float((s.exp() * (s - t)).sum())
        fwd += float((t.exp() * (t - s)).sum())
        nll -= float(s.gather(-1, torch.tensor(completion).unsqueeze(-1)).sum())
        tokens += len(completion)
    return rev / tokens, fwd / tokens, nll / tokens, tokens


@torch.no_grad()
def test_fixed_text_kl_matches_a_per_sequence_computation(tiny_student, tiny_teacher_model, tiny_tokenizer):
    ids = _ids(tiny_tokenizer)
    teacher = HFTeacher(tiny_teacher_model)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    fixed = FixedText(ids, teacher_greedy_completions(teacher, ids, eos, 8, 4), 8)
    got = evaluate_fixed_text_kl(tiny_student, teacher, fixed, pad, eos, batch_size=4)
    rev, fwd, nll, tokens = _manual_fixed_text_kl(tiny_student, tiny_teacher_model, fixed)
    assert got.tokens == tokens
    assert got.reverse_kl == pytest.approx(rev, rel=1e-4)
    assert got.forward_kl == pytest.approx(fwd, rel=1e-4)
    assert got.nll == pytest.approx(nll, rel=1e-4)
    assert got.reverse_kl > 0.05
    same = evaluate_fixed_text_kl(tiny_teacher_model, teacher, fixed, pad, eos, batch_size=4)
    assert same.reverse_kl == pytest.approx(0.0, abs=1e-5) and same.forward_kl == pytest.approx(0.0, abs=1e-5)


class CountingTeacher:
    """Wraps a scorer and counts its calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.vocab_size = inner.vocab_size
        self.returns_full_logprobs = True

    def score(self, *args, **kwargs):
        self.calls += 1
        return self.inner.score(*args, **kwargs)


def test_fixed_text_is_made_once_and_checked_when_reused(tmp_path, tiny_teacher_model, tiny_tokenizer):
    ids = _ids(tiny_tokenizer)
    teacher = CountingTeacher(HFTeacher(tiny_teacher_model))
    eos = tiny_tokenizer.eos_token_id
    first = load_or_make_fixed_text(tmp_path / "f.json", teacher, ids, eos, 6, 4, "teacher A")
    made = teacher.calls
    assert made > 0
    again = load_or_make_fixed_text(tmp_path / "f.json", teacher, ids, eos, 6, 4, "teacher A")
    assert teacher.calls == made and again.completion_ids == first.completion_ids
    with pytest.raises(ValueError, match="delete it"):
        load_or_make_fixed_text(tmp_path / "f.json", teacher, ids[:3], eos, 6, 4, "teacher A")
    with pytest.raises(ValueError, match="delete it"):
        load_or_make_fixed_text(tmp_path / "f.json", teacher, ids, eos, 6, 4, "teacher B")
    # a directory holds one file per prompt set
    load_or_make_fixed_text(tmp_path / "cache", teacher, ids, eos, 6, 4, "teacher A")
    load_or_make_fixed_text(tmp_path / "cache", teacher, ids[:3], eos, 6, 4, "teacher A")
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_trainer_reports_fixed_text_kl_and_it_falls(tmp_path):
    _, evals = _trainer_run(tmp_path / "run", "eval_fixed_text=true", "max_steps=8", "eval_steps=4")
    assert (tmp_path / "run" / "fixed_text.json").is_file()
    values = [r["eval_fixed_text_kl"] for r in evals]
    assert values[-1] < values[0] - 0.01  # the tiny student learns the teacher, on the teacher's own text too
    assert all(r["eval_fixed_text_tokens"] == evals[0]["eval_fixed_text_tokens"] > 0 for r in evals)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["eval_sampling_seeds=0"], "eval_sampling_seeds must be >= 1"),
        (["eval_fixed_text=true", "teacher.backend=vllm_server", "objective.name=pg"], "teacher.eval_backend=hf"),
    ],
)
def test_config_rejects_bad_eval_settings(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(TINY_CONFIG, overrides)
