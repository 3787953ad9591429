"""The objectives' math, on hand-made distributions."""

import math

import pytest
import torch

from lockedopd.opd import objectives as obj


def _logp(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def test_kls_are_zero_when_student_equals_teacher():
    logits = torch.randn(2, 3, 7, dtype=torch.float64)
    lp = torch.log_softmax(logits, -1)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert obj.reverse_kl_loss(lp, lp, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert obj.forward_kl_loss(lp, lp, mask).item() == pytest.approx(0.0, abs=1e-12)
    for beta in (0.0, 0.3, 1.0):
        assert obj.generalized_jsd_loss(lp, lp, mask, beta).item() == pytest.approx(0.0, abs=1e-12)
    ids = lp.topk(4, -1).indices
    for tail in ("bucket", "renormalize"):
        assert obj.topk_reverse_kl_loss(lp, ids, lp.gather(-1, ids), mask, tail=tail).item() == pytest.approx(
            0.0, abs=1e-12
        )
    adv = obj.opd_advantages(lp[..., 0], lp[..., 0])
    assert torch.count_nonzero(adv) == 0


def test_known_values_on_two_token_distributions():
    s = _logp([[[0.5, 0.5]]])
    t = _logp([[[0.9, 0.1]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    reverse = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    forward = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert obj.reverse_kl_loss(s, t, mask).item() == pytest.approx(reverse, rel=1e-12)
    assert obj.forward_kl_loss(s, t, mask).item() == pytest.approx(forward, rel=1e-12)
    # JSD limits follow TRL: beta=0 forward KL, beta=1 reverse KL; beta=0.5 the symmetric JSD
    assert obj.generalized_jsd_loss(s, t, mask, 0.0).item() == pytest.approx(forward, rel=1e-12)
    assert obj.generalized_jsd_loss(s, t, mask, 1.0).item() == pytest.approx(reverse, rel=1e-12)
    m = [0.7, 0.3]
    jsd = 0.5 * (0.9 * math.log(0.9 / m[0]) + 0.1 * math.log(0.1 / m[1])) + 0.5 * (
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    )
    assert obj.generalized_jsd_loss(s, t, mask, 0.5).item() == pytest.approx(jsd, rel=1e-12)
    assert obj.generalized_jsd_loss(t, s, mask, 0.5).item() == pytest.approx(jsd, rel=1e-12)  # symmetric at 0.5


def test_topk_reverse_kl_renormalises_on_teacher_support():
    s = _logp([[[0.4, 0.4, 0.2]]])
    t = _logp([[[0.6, 0.2, 0.2]]])
    ids = torch.tensor([[[0, 1]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    got = obj.topk_reverse_kl_loss(s, ids, t.gather(-1, ids), mask, tail="renormalize").item()
    # renormalised: student (0.5, 0.5), teacher (0.75, 0.25)
    assert got == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25), rel=1e-12)
    full_ids = torch.tensor([[[0, 1, 2]]])
    for tail in ("renormalize", "bucket"):
        assert obj.topk_reverse_kl_loss(s, full_ids, t, mask, tail=tail).item() == pytest.approx(
            obj.reverse_kl_loss(s, t, mask).item(), rel=1e-9
        )


def test_topk_reverse_kl_tail_bucket_values_and_bound():
    s = _logp([[[0.4, 0.4, 0.2]]])
    t = _logp([[[0.6, 0.3, 0.1]]])
    ids = torch.tensor([[[0, 1]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    got = obj.topk_reverse_kl_loss(s, ids, t.gather(-1, ids), mask, tail="bucket").item()
    # buckets: student (0.4, 0.4 | 0.2), teacher (0.6, 0.3 | 0.1)
    expected = 0.4 * math.log(0.4 / 0.6) + 0.4 * math.log(0.4 / 0.3) + 0.2 * math.log(0.2 / 0.1)
    assert got == pytest.approx(expected, rel=1e-12)
    # coarse-graining never increases a KL: a lower bound on the exact reverse KL, for random distributions too
    gen = torch.Generator().manual_seed(0)
    s_rand = torch.log_softmax(torch.randn(3, 5, 11, generator=gen, dtype=torch.float64), -1)
    t_rand = torch.log_softmax(torch.randn(3, 5, 11, generator=gen, dtype=torch.float64), -1)
    top = t_rand.topk(4, -1).indices
    bound = obj.topk_reverse_kl_per_token(s_rand, top, t_rand.gather(-1, top))
    exact = obj.reverse_kl_per_token(s_rand, t_rand)
    assert bool((bound <= exact + 1e-12).all()) and bool((bound > 0).all())


def test_topk_reverse_kl_tail_penalises_student_mass_outside_the_teacher_top_k():
    t = _logp([[[0.5, 0.45, 0.05]]])
    s = _logp([[[0.05, 0.045, 0.905]]])  # same shape on the top-2, but most mass on a token the teacher rejects
    ids = torch.tensor([[[0, 1]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    renormalised = obj.topk_reverse_kl_loss(s, ids, t.gather(-1, ids), mask, tail="renormalize").item()
    with_tail = obj.topk_reverse_kl_loss(s, ids, t.gather(-1, ids), mask, tail="bucket").item()
    assert renormalised == pytest.approx(0.0, abs=1e-12)
    assert with_tail == pytest.approx(
        0.05 * math.log(0.1) + 0.045 * math.log(0.1) + 0.905 * math.log(0.905 / 0.05), rel=1e-12
    )


def test_topk_reverse_kl_is_finite_on_padded_positions():
    # scorers pad positions past a completion with id 0 and log-prob 0 (k copies): masked out, but never NaN
    s = torch.log_softmax(torch.randn(1, 2, 6, dtype=torch.float32), -1).requires_grad_()
    ids = torch.tensor([[[2, 4, 1], [0, 0, 0]]])
    t_lp = torch.tensor([[[-0.5, -1.5, -2.5], [0.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    loss = obj.topk_reverse_kl_loss(s, ids, t_lp, mask, tail="bucket")
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(s.grad).all())
    assert loss.item() == pytest.approx(obj.topk_reverse_kl_per_token(s, ids, t_lp)[0, 0].item(), rel=1e-6)


def test_masking_ignores_padded_tokens():
    s = torch.log_softmax(torch.randn(1, 2, 5, dtype=torch.float64), -1)
    t = torch.log_softmax(torch.randn(1, 2, 5, dtype=torch.float64), -1)
    mask = torch.tensor([[True, False]])
    expected = obj.reverse_kl_per_token(s, t)[0, 0].item()
    assert obj.reverse_kl_loss(s, t, mask).item() == pytest.approx(expected, rel=1e-12)
    t_changed = t.clone()
    t_changed[0, 1] = torch.log_softmax(torch.randn(5, dtype=torch.float64), -1)
    assert obj.reverse_kl_loss(s, t_changed, mask).item() == pytest.approx(expected, rel=1e-12)


def test_policy_gradient_gradient_is_sampled_reverse_kl_score_function():
    student_tok = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    teacher_tok = torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.tensor([[True, True, False]])
    adv = obj.opd_advantages(student_tok, teacher_tok)
    assert adv.tolist() == [[-0.5, 1.0, 0.0]]
    loss = obj.policy_gradient_loss(student_tok, adv, mask)
    loss.backward()
    # d/dlogp of -(A * ratio) / n at ratio 1 is -A / n on kept tokens, 0 on masked ones
    assert student_tok.grad[0].tolist() == pytest.approx([0.25, -0.5, 0.0])
    assert loss.item() == pytest.approx(-(-0.5 + 1.0) / 2)


def test_sparsify_keeps_exact_fraction_and_top_scores():
    scores = torch.arange(20, dtype=torch.float32).view(2, 10)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False  # 17 eligible tokens
    for frac in (0.25, 0.5, 1.0):
        kept = obj.sparsify_token_mask(scores, mask, frac, "top")
        assert int(kept.sum()) == round(frac * 17)
        assert not (kept & ~mask).any()
    kept = obj.sparsify_token_mask(scores, mask, 0.25, "top")
    # the 4 highest eligible scores: row 1 positions 3..6 (13..16)
    assert kept[1, 3:7].all() and int(kept.sum()) == 4
    gen = torch.Generator().manual_seed(0)
    rand = obj.sparsify_token_mask(scores, mask, 0.5, "random", gen)
    assert int(rand.sum()) == round(0.5 * 17) and not (rand & ~mask).any()
    with pytest.raises(ValueError, match="keep_fraction"):
        obj.sparsify_token_mask(scores, mask, 0.0)
    with pytest.raises(ValueError, match="mode"):
        obj.sparsify_token_mask(scores, mask, 0.5, "bottom")


def test_mixing_at_lambda_one_is_pure_opd_and_interpolates():
    a_opd = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    a_rew = torch.tensor([1.0, -1.0])
    assert torch.equal(obj.mix_advantages(a_opd, a_rew, 1.0), a_opd)
    assert torch.equal(obj.mix_advantages(a_opd, a_rew, 0.0), torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    assert obj.mix_advantages(a_opd, a_rew, 0.25).flatten().tolist() == pytest.approx([0.875, 0.5, -0.25, -0.75])
    with pytest.raises(ValueError, match="lambda"):
        obj.mix_advantages(a_opd, a_rew, 1.5)


def test_group_normalized_rewards():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert obj.group_normalized_rewards(rewards).tolist() == pytest.approx([0.25, -0.75, 0.25, 0.25])
    groups = torch.tensor([0, 0, 1, 1])
    assert obj.group_normalized_rewards(rewards, groups).tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])


def test_exact_reverse_kl_gradient_matches_finite_difference():
    logits = torch.randn(1, 1, 4, dtype=torch.float64, requires_grad=True)
    t = torch.log_softmax(torch.randn(1, 1, 4, dtype=torch.float64), -1)
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss = obj.reverse_kl_loss(torch.log_softmax(logits, -1), t, mask)
    loss.backward()
    eps = 1e-6
    for i in range(4):
        bumped = logits.detach().clone()
        bumped[0, 0, i] += eps
        numeric = (obj.reverse_kl_loss(torch.log_softmax(bumped, -1), t, mask) - loss.detach()) / eps
        assert logits.grad[0, 0, i].item() == pytest.approx(numeric.item(), abs=1e-5)


def test_topk_sampled_tail_is_unbiased_in_value_and_gradient():
    # enumerate every token y the student could sample, weighted by π_S(y): the expectation must be the exact
    # reverse KL and its exact gradient, although only the top-k and the sampled token's teacher log-prob are used
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 1, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.log_softmax(torch.randn(1, 1, 9, generator=gen, dtype=torch.float64) * 2, -1)
    ids = t.topk(3, -1).indices
    mask = torch.ones(1, 1, dtype=torch.bool)
    s = torch.log_softmax(logits, -1)
    exact = obj.reverse_kl_loss(s, t, mask)
    (exact_grad,) = torch.autograd.grad(exact, logits)
    probs = s.exp().detach()[0, 0]
    value, grad = 0.0, torch.zeros_like(logits)
    for y in range(9):
        s = torch.log_softmax(logits, -1)
        sampled = torch.tensor([[y]])
        est = obj.topk_reverse_kl_loss(
            s, ids, t.gather(-1, ids), mask, tail="sampled", sampled_ids=sampled, teacher_token_logprobs=t[..., y]
        )
        (g,) = torch.autograd.grad(est, logits)
        value += probs[y].item() * est.item()
        grad += probs[y] * g
        if y in ids[0, 0].tolist():  # a top-k sample adds no tail term: the value is the top-k part alone
            head = (s.exp() * (s - t)).gather(-1, ids).sum().item()
            assert est.item() == pytest.approx(head, rel=1e-12)
    assert value == pytest.approx(exact.item(), rel=1e-10)
    assert torch.allclose(grad, exact_grad, atol=1e-12, rtol=1e-9)
    with pytest.raises(ValueError, match="sampled_ids"):
        obj.topk_reverse_kl_loss(s, ids, t.gather(-1, ids), mask, tail="sampled")
