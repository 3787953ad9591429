"""The chunked OPD loss (objective.chunk_size) equals the unchunked one, and holds fewer vocabulary-sized bytes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lockedopd.opd.chunked_loss import rollout_opd_loss, token_chunks
from lockedopd.opd.config import ObjectiveConfig
from lockedopd.opd.rollout import generate_rollout
from lockedopd.teachers import HFTeacher

TOL = 1e-6


@pytest.fixture()
def scored(tiny_student, tiny_teacher_model, tiny_tokenizer):
    """A student rollout of 4 prompts (unequal lengths, some stopping early) and a teacher returning both forms."""
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    rollout = generate_rollout(
        tiny_student, prompts, tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id, 12, seed=3
    )
    assert not bool(rollout.completion_mask.all()) or rollout.completion_mask.shape[1] == 12
    dense = HFTeacher(tiny_teacher_model, batch_size=3)
    hidden = HFTeacher(tiny_teacher_model, batch_size=3, keep_hidden_states=True)
    return rollout, dense, hidden


def _loss_and_grads(model, rollout, scores, config, rewards=None):
    model.zero_grad(set_to_none=True)
    out = rollout_opd_loss(model, rollout, scores, config, rewards, generator=torch.Generator().manual_seed(7))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(reference, candidate):
    (ref_out, ref_grads), (out, grads) = reference, candidate
    assert torch.allclose(out.loss, ref_out.loss, atol=TOL, rtol=TOL), (float(out.loss), float(ref_out.loss))
    assert out.tokens == ref_out.tokens and out.kept_tokens == ref_out.kept_tokens
    assert out.reverse_kl == pytest.approx(ref_out.reverse_kl, abs=TOL)
    if ref_out.exact_reverse_kl is not None:
        assert out.exact_reverse_kl == pytest.approx(ref_out.exact_reverse_kl, abs=TOL)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, atol=TOL, rtol=TOL), (name, float((grads[name] - grad).abs().max()))


CASES = [
    {"name": "reverse_kl"},
    {"name": "forward_kl"},
    {"name": "jsd", "beta": 0.3},
    {"name": "pg"},
    {"name": "topk_reverse_kl", "top_k": 5, "topk_tail": "sampled"},
    {"name": "topk_reverse_kl", "top_k": 5, "topk_tail": "bucket"},
    {"name": "topk_reverse_kl", "top_k": 5, "topk_tail": "renormalize"},
    {"name": "reverse_kl", "token_keep_fraction": 0.5, "token_keep_mode": "top"},
    {"name": "pg", "token_keep_fraction": 0.6, "token_keep_mode": "random"},
    {"name": "pg", "reward_lambda": 0.5, "reward_fn": "contains_answer"},
    {"name": "reverse_kl", "reward_lambda": 0.5, "reward_fn": "contains_answer"},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_chunked_equals_unchunked_value_and_gradients(scored, tiny_student, case):
    rollout, dense_teacher, hidden_teacher = scored
    config = ObjectiveConfig(**case)
    request = {"top_k": config.top_k if config.name == "topk_reverse_kl" else 0, "full_logprobs": True}
    dense = dense_teacher.score(rollout.sequences(), rollout.prompt_lengths, **request)
    hidden = hidden_teacher.score(rollout.sequences(), rollout.prompt_lengths, **request)
    assert hidden.full_logprobs is None and hidden.full_hidden is not None
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0]) if config.reward_lambda < 1 else None
    reference = _loss_and_grads(tiny_student, rollout, dense, config, rewards)
    assert rollout.num_tokens > 7  # several chunks of 3 and of 7 tokens, the last one partial
    for chunk_size, scores in [(3, dense), (7, hidden), (1000, hidden)]:
        chunked = dataclasses.replace(config, chunk_size=chunk_size)
        _assert_same(reference, _loss_and_grads(tiny_student, rollout, scores, chunked, rewards))


def test_hidden_state_teacher_matches_dense_log_probs(scored):
    rollout, dense_teacher, hidden_teacher = scored
    dense = dense_teacher.score(rollout.sequences(), rollout.prompt_lengths, top_k=4, full_logprobs=True)
    hidden = hidden_teacher.score(rollout.sequences(), rollout.prompt_lengths, top_k=4, full_logprobs=True)
    mask = dense.mask.unsqueeze(-1)
    assert torch.allclose(hidden.dense_full_logprobs() * mask, dense.full_logprobs * mask, atol=1e-6)
    assert torch.allclose(hidden.token_logprobs, dense.token_logprobs, atol=1e-6)
    assert torch.equal(hidden.topk_ids[dense.mask], dense.topk_ids[dense.mask])
    # (B, C, H) instead of (B, C, V): the tiny models' 32-wide hidden states against a 103-token vocabulary
    assert hidden.full_hidden.hidden.shape[-1] == 32 and dense.full_logprobs.shape[-1] == 103


def test_token_chunks_cover_every_token_once():
    assert token_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert token_chunks(0, 4) == []
    with pytest.raises(ValueError, match="chunk_size"):
        token_chunks(3, 0)


def test_objective_that_is_not_a_token_mean_refuses_chunks(scored, tiny_student):
    from lockedopd.opd.objective_registry import OBJECTIVES, SAMPLED_TOKEN, register_objective

    @register_objective("test_sum_not_mean", needs=SAMPLED_TOKEN, token_mean=False, replace=True)
    def summed(inputs):
        return -(inputs.advantages * inputs.student_token_logprobs)[inputs.mask].sum()

    try:
        rollout, dense_teacher, _ = scored
        scores = dense_teacher.score(rollout.sequences(), rollout.prompt_lengths)
        with pytest.raises(ValueError, match="chunk_size=0"):
            rollout_opd_loss(tiny_student, rollout, scores, ObjectiveConfig(name="test_sum_not_mean", chunk_size=4))
    finally:
        OBJECTIVES.pop("test_sum_not_mean", None)


def test_chunked_loss_holds_one_chunk_of_vocabulary_sized_tensors():
    """Counted bytes, not time: B × C × V float32 tensors are what chunking removes from the loss's peak."""
    from lockedopd.diagnostics.memory import PeakLiveBytes, SavedTensorBytes
    from lockedopd.models import build_tiny_llama
    from lockedopd.opd.rollout import rollout_from_completions

    vocab, batch, completion = 4096, 4, 32
    student = build_tiny_llama(vocab, num_layers=1, seed=0)
    teacher = build_tiny_llama(vocab, num_layers=1, seed=1)
    generator = torch.Generator().manual_seed(0)
    completions = [torch.randint(3, vocab, (completion,), generator=generator).tolist() for _ in range(batch)]
    rollout = rollout_from_completions([[1, 2, 3]] * batch, completions, None, 0, None)
    one_copy = batch * completion * vocab * 4  # one (B, C, V) float32 tensor: 2 MiB
    measured = {}
    for chunk_size in (0, 16):
        scorer = HFTeacher(teacher, keep_hidden_states=chunk_size > 0)
        with PeakLiveBytes() as teacher_live:
            scores = scorer.score(rollout.sequences(), rollout.prompt_lengths, full_logprobs=True)
        config = ObjectiveConfig(name="reverse_kl", chunk_size=chunk_size)
        with SavedTensorBytes(exclude=student.parameters()) as saved, PeakLiveBytes() as live:
            out = rollout_opd_loss(student, rollout, scores, config)
            out.loss.backward()
        student.zero_grad(set_to_none=True)
        measured[chunk_size] = (saved.bytes, live.peak_bytes, teacher_live.peak_bytes, float(out.loss.detach()))
    (saved_full, peak_full, teacher_full, loss_full), (saved_chunk, peak_chunk, teacher_chunk, loss_chunk) = (
        measured[0],
        measured[16],
    )
    assert loss_chunk == pytest.approx(loss_full, abs=TOL)
    # unchunked, autograd keeps the log-softmax and the teacher's log-probs the KL reads, for every position (the
    # exact KL's own backward recomputes its terms: objectives._ReverseKLPerToken)
    assert saved_full >= 2 * one_copy
    # chunked it keeps the decoder's activations and the (tokens × hidden) states only: no (B, C, V) tensor
    assert saved_chunk < 0.25 * one_copy
    # the step's peak (forward + backward) loses at least two full copies; one chunk is 1/8 of a copy
    assert peak_chunk < peak_full - 2 * one_copy
    # the teacher hands over (B, C, H) hidden states instead of (B, C, V) log-probs
    assert teacher_chunk < teacher_full - one_copy


def test_held_out_evaluation_in_chunks_gives_the_same_kls():
    from lockedopd.diagnostics.memory import PeakLiveBytes
    from lockedopd.models import build_tiny_llama
    from lockedopd.opd.evaluation import evaluate_reverse_kl
    from lockedopd.opd.rollout import StudentSampler, rollout_from_completions

    vocab, batch, completion = 4096, 4, 32
    student = build_tiny_llama(vocab, num_layers=1, seed=0, init_std=0.2)
    teacher_model = build_tiny_llama(vocab, num_layers=1, seed=1, init_std=0.2)
    generator = torch.Generator().manual_seed(0)
    prompts = [[1, 2, 3 + i] for i in range(batch)]
    completions = [torch.randint(3, vocab, (completion - i,), generator=generator).tolist() for i in range(batch)]
    sampled = rollout_from_completions(prompts, completions, None, 0, None)

    class Sampled(StudentSampler):  # fixed samples, so the peaks count scoring and KL only
        def sample(self, prompt_ids, settings, seed):
            return sampled

    results = {}
    for chunk_size in (0, 16):
        teacher = HFTeacher(teacher_model, keep_hidden_states=chunk_size > 0)
        with PeakLiveBytes() as live:
            result = evaluate_reverse_kl(
                student, teacher, prompts, 0, None, completion, batch, seed=4, sampler=Sampled(), chunk_size=chunk_size
            )
        results[chunk_size] = (result, live.peak_bytes)
    (plain, plain_peak), (chunked, chunked_peak) = results[0], results[16]
    assert chunked.tokens == plain.tokens == sampled.num_tokens
    assert chunked.reverse_kl == pytest.approx(plain.reverse_kl, abs=TOL) and plain.reverse_kl > 0.1
    assert chunked.sampled_reverse_kl == pytest.approx(plain.sampled_reverse_kl, abs=TOL)
    one_copy = batch * completion * vocab * 4  # one float32 (B, C, V) tensor: 2 MiB
    # unchunked: the teacher's (B, C, V) log-probs, the student's log-probs and the KL's terms at once
    assert chunked_peak < plain_peak - 2 * one_copy, (plain_peak, chunked_peak, one_copy)
