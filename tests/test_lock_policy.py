"""One lock decision (LockPolicy) and one lock transition (phases.py) for OPDTrainer and the TRL callback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lockedopd.lock.phases import carry_path_for, enter_locked_phase, leave_locked_phase, load_locked_phase
from lockedopd.lock.watch import WarmupWatch
from lockedopd.optim import LockedAdamW, WarmupCarry
from lockedopd.runtime.distributed import DistContext
from lockedopd.subspace import LockPolicy, SubspaceBasis, TrackerSettings
from tests.test_trainer import run


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 12, bias=False)
        self.b = nn.Linear(12, 16, bias=False)


def _step_in_fixed_subspace(model, gen):
    """A weight update inside a fixed rank-2 subspace: the tracker sees a stable subspace from the first check."""
    with torch.no_grad():
        for lin, seed in ((model.a, 0), (model.b, 1)):
            g = torch.Generator().manual_seed(seed)
            L, R = torch.randn(lin.weight.shape[0], 2, generator=g), torch.randn(lin.weight.shape[1], 2, generator=g)
            lin.weight += 1e-2 * L @ torch.diag(torch.rand(2, generator=gen) + 0.5) @ R.T


def _decisions(policy, model, steps):
    gen = torch.Generator().manual_seed(5)
    policy.start(model, ["a", "b"], seed=0)
    for step in range(1, steps + 1):
        _step_in_fixed_subspace(model, gen)
        decision = policy.observe(step)
        if decision is not None:
            return decision
    return None


def test_policy_locks_when_stable_or_at_the_bound():
    settings = TrackerSettings(rank=2, check_every=1, patience=2, min_warmup_steps=1)
    stable = _decisions(LockPolicy(settings), _Two(), 10)
    assert stable.reason == "stable" and stable.step == 3  # first check has nothing to compare: checks 2, 3 agree
    bounded = TrackerSettings(rank=2, check_every=1, patience=2, min_warmup_steps=8, max_warmup_steps=5)
    assert _decisions(LockPolicy(bounded), _Two(), 10) == type(stable)(5, "max_warmup_steps")


def test_at_step_pins_the_lock_step_even_when_stable_earlier_or_bounded():
    settings = TrackerSettings(rank=2, check_every=1, patience=2, min_warmup_steps=1, max_warmup_steps=2)
    policy = LockPolicy(settings, at_step=7)
    decision = _decisions(policy, _Two(), 10)
    assert decision.step == 7 and decision.reason == "at_step"
    # checks ran (and are reported) until the tracker found the subspace stable at step 3; the bound did not apply
    assert len(policy.tracker.history) == 3 and policy.tracker.reason == "stable"
    with pytest.raises(ValueError, match="at_step must be None or an int >= 1"):
        LockPolicy(settings, at_step=0)


def test_at_step_means_the_same_in_opd_trainer_and_the_trl_callback(tmp_path):
    """The tiny recipe's stability test locks by step 6 (max_warmup_steps); at_step=8 must win in both loops."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from lockedopd.integrations.trl import SubspaceLockCallback

    summary = run(tmp_path / "opd", "max_steps=9", "eval_steps=0", "lock.at_step=8", "lock.max_warmup_steps=3")
    assert summary["lock_step"] == 8 and summary["lock_reason"] == "at_step"

    model = _Two()
    args = TrainingArguments(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True)
    callback = SubspaceLockCallback(rank=2, check_every=1, patience=2, min_warmup_steps=1, max_warmup_steps=3,
                                    at_step=8)  # fmt: skip
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control, model=model)
    gen = torch.Generator().manual_seed(5)
    for step in range(1, 11):
        _step_in_fixed_subspace(model, gen)
        state.global_step = step
        callback.on_step_end(args, state, control, model=model)
        if control.should_training_stop:
            break
    assert callback.locked_step == 8 and callback.lock_reason == "at_step"


def _warm(seed=0):
    """A model trained a few AdamW steps, its optimizer and rank-2 bases of both matrices."""
    model = _Two()
    opt = torch.optim.AdamW([model.a.weight, model.b.weight], lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        loss = (model.b(model.a(torch.randn(4, 16, generator=gen))) ** 2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    bases = {}
    for name, lin in (("a", model.a), ("b", model.b)):
        U, _, Vh = torch.linalg.svd(torch.randn(*lin.weight.shape, generator=gen), full_matrices=False)
        bases[name] = SubspaceBasis(Vh[:2].T.contiguous(), U[:, :2].contiguous(), "right")
    return model, opt, bases


@pytest.mark.parametrize("mode", ["right", "two_sided"])
def test_carry_round_trips_and_enters_the_same_locked_phase(tmp_path, mode):
    model, opt, bases = _warm()
    bases = {n: b.with_mode(mode) for n, b in bases.items()}
    full = {"a": model.a.weight, "b": model.b.weight}
    carry = WarmupCarry.from_optimizer(opt, full, bases)
    for name, basis in bases.items():
        m, v = basis.reduce_moments(opt.state[full[name]]["exp_avg"], opt.state[full[name]]["exp_avg_sq"])
        torch.testing.assert_close(carry.exp_avg[name], m)
        torch.testing.assert_close(carry.exp_avg_sq[name], v)
        assert carry.steps[name] == 3.0 and carry.lr_scales[name] >= 1.0
    path = SubspaceBasis.save_all(tmp_path / "basis.safetensors", bases, {"step": 3})
    carry.save(carry_path_for(path))
    loaded = WarmupCarry.load(carry_path_for(path))
    assert loaded.lr_scales == carry.lr_scales and loaded.steps == carry.steps

    import copy

    direct = enter_locked_phase(copy.deepcopy(model), bases, path, carry, lr=1e-3, optimizer="coefficients")
    from_files = load_locked_phase(copy.deepcopy(model), path, lr=1e-3, mode=mode, optimizer="coefficients")
    assert isinstance(from_files.optimizer, LockedAdamW)
    assert direct.lr_scales() == from_files.lr_scales() == carry.lr_scales
    for (name, p), q in zip(direct.coefficients().items(), from_files.coefficients().values()):
        assert p.shape == bases[name].coefficient_shape(full[name].shape[0])
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(direct.optimizer.state[p][key], from_files.optimizer.state[q][key])
    for group in from_files.optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])
    with pytest.raises(ValueError, match="another mode or rank"):
        other = "two_sided" if mode == "right" else "right"
        enter_locked_phase(copy.deepcopy(model), {n: b.with_mode(other) for n, b in bases.items()}, path, carry, lr=1,
                           optimizer="coefficients")  # fmt: skip


def test_leave_locked_phase_folds_the_adapter_and_lifts_the_moments(tmp_path):
    model, opt, bases = _warm()
    path = SubspaceBasis.save_all(tmp_path / "basis.safetensors", bases, {"step": 3})
    phase = enter_locked_phase(model, bases, path, None, lr=1e-2, optimizer="coefficients")
    gen = torch.Generator().manual_seed(9)
    for _ in range(2):
        loss = phase.model.base_model.model.b(phase.model.base_model.model.a(torch.randn(4, 16, generator=gen))) ** 2
        loss.sum().backward()
        phase.optimizer.step()
        phase.optimizer.zero_grad()
    merged = phase.merged_state_dict()
    coefficient_state = {n: dict(phase.optimizer.state[p]) for n, p in phase.coefficients().items()}
    plain, full_opt = leave_locked_phase(phase, ["a", "b"], lr=1e-2)
    for name in ("a", "b"):
        weight = plain.get_submodule(name).weight
        torch.testing.assert_close(weight.detach(), merged[f"{name}.weight"])
        state = full_opt.state[weight]
        m, _ = bases[name].lift_moments(coefficient_state[name]["exp_avg"], coefficient_state[name]["exp_avg_sq"])
        torch.testing.assert_close(state["exp_avg"], m)
        assert float(state["step"]) == 2.0 and weight.requires_grad


class _NotMain(DistContext):
    """A second process of a data-parallel run, as the watch sees it: it receives the main process's objects."""

    def __init__(self, main_objects):
        super().__init__()
        self.main_objects = main_objects

    @property
    def is_main(self) -> bool:
        return False

    def broadcast_object(self, obj, src=0):
        assert obj is None or obj == (None, None)  # this process decided nothing and holds no bases
        return self.main_objects.pop(0)


def test_the_warmup_watch_gives_every_process_the_main_processes_decision_checks_and_bases():
    settings = TrackerSettings(rank=2, check_every=1, patience=2, min_warmup_steps=1)
    main, model, gen = WarmupWatch(settings, None, DistContext()), _Two(), torch.Generator().manual_seed(5)
    main.start(model, ["a", "b"], seed=0)
    sent = []
    for step in range(1, 4):
        _step_in_fixed_subspace(model, gen)
        sent.append(main.observe(step))
    decisions, checks = zip(*sent)
    assert decisions[:2] == (None, None) and (decisions[2].step, decisions[2].reason) == (3, "stable")
    assert checks[0]["fraction_stable"] == 0.0 and checks[2]["fraction_stable"] == 1.0
    bases = main.bases("two_sided")
    assert sorted(bases) == ["a", "b"] and bases["a"].U.shape == (12, 2)

    other = WarmupWatch(settings, None, _NotMain([*sent, bases]))
    other.start(_Two(), ["a", "b"], seed=0)
    assert other.policy is None  # only the main process sketches
    assert [other.observe(step) for step in range(1, 4)] == sent
    assert other.bases("two_sided") is bases
