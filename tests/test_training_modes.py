"""The paper's other training modes in the same loop: RLVR on a verifier (group-normalised rewards, no teacher) and
off-policy OPD (rollouts sampled by the teacher or by a frozen copy of the initial student)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from lockedopd.opd import OPDTrainer, load_config
from lockedopd.opd.objectives import group_normalized_rewards
from lockedopd.tasks import COLUMN_ADDITION
from lockedopd.tasks.base import write_task_splits
from tests.conftest import TINY_CONFIG
from tests.test_trainer import final_weights, read_metrics, run

PROMPTS_PER_STEP = 4


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("column_addition")
    return write_task_splits(COLUMN_ADDITION, out, {"train": 32, "validation": 8, "test": 8}, seed=0)


def completion_length(completions: Sequence[str], answers: Sequence[str | None]) -> list[float]:
    """A reward that differs between the samples of one prompt: the completion's length."""
    return [float(len(text)) for text in completions]


def answer_length(completions: Sequence[str], answers: Sequence[str | None]) -> list[float]:
    """A reward that is the same for every sample of one prompt (and differs between prompts)."""
    return [float(len(str(answer))) for answer in answers]


def rlvr_config(out, files, *overrides):
    return load_config(
        TINY_CONFIG,
        [
            f"output_dir={out}", "progress=false", "objective.name=rlvr", "lock.enabled=false", "max_steps=2",
            f"data.train_path={files['train']}", f"data.eval_path={files['validation']}", "eval_steps=2",
            "save_steps=0", f"batch_size={PROMPTS_PER_STEP}", "rollout.max_new_tokens=6", "lr=0.01", *overrides,
        ],
    )  # fmt: skip


def trained_weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def largest_change(before, trainer):
    return max((p.detach() - before[n]).abs().max().item() for n, p in trainer.model.named_parameters() if n in before)


def test_group_normalised_rewards_are_zero_mean_in_every_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    adv = group_normalized_rewards(rewards, groups)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, -0.25, 0.25]))
    for g in groups.unique():
        assert adv[groups == g].sum().abs() < 1e-7
    assert torch.allclose(group_normalized_rewards(rewards), rewards - rewards.mean())  # one group: the batch


def test_rlvr_learns_from_rewards_that_differ_within_a_prompts_samples(tmp_path, task_files):
    config = rlvr_config(tmp_path, task_files, "rollout.samples_per_prompt=4",
                         "objective.reward_fn=tests.test_training_modes:completion_length")  # fmt: skip
    trainer = OPDTrainer.from_config(config)
    assert trainer.teacher is None  # RLVR builds no teacher
    before = trained_weights(trainer)
    trainer.train()
    assert largest_change(before, trainer) > 1e-4
    steps = [r for r in read_metrics(tmp_path) if r["step"] > 0]
    # 4 prompts x 4 samples of up to 6 tokens: the mean completion length is the mean reward
    assert [r["step"] for r in steps] == [1, 2] and all(0.0 < r["reward"] <= 6.0 for r in steps)


def test_rlvr_with_a_reward_constant_in_each_group_does_not_move_the_student(tmp_path, task_files):
    # every sample of a prompt gets its prompt's reward: minus the group's mean, every advantage is zero
    grouped = OPDTrainer.from_config(
        rlvr_config(
            tmp_path / "grouped",
            task_files,
            "rollout.samples_per_prompt=3",
            "objective.reward_fn=tests.test_training_modes:answer_length",
        )  # fmt: skip
    )
    before = trained_weights(grouped)
    grouped.train()
    assert largest_change(before, grouped) == 0.0
    # one sample per prompt: the baseline is the batch's mean reward, and prompts' rewards differ
    batch = OPDTrainer.from_config(
        rlvr_config(tmp_path / "batch", task_files, "objective.reward_fn=tests.test_training_modes:answer_length")
    )
    before = trained_weights(batch)
    batch.train()
    assert largest_change(before, batch) > 1e-4


def test_rlvr_settings_that_cannot_work_are_refused(tmp_path, task_files):
    with pytest.raises(ValueError, match="objective.name=rlvr trains on its samples' verifiable rewards.*reward_fn"):
        rlvr_config(tmp_path, task_files)
    with pytest.raises(ValueError, match="rlvr .* does not work with eval_fixed_text=true"):
        rlvr_config(tmp_path, task_files, "objective.reward_fn=column_addition", "eval_fixed_text=true")
    with pytest.raises(ValueError, match="objective.name=sft .* does not work with rollout.samples_per_prompt > 1"):
        rlvr_config(tmp_path, task_files, "objective.name=sft", "rollout.samples_per_prompt=2")
    with pytest.raises(ValueError, match="rollout.samples_per_prompt must be >= 1"):
        rlvr_config(tmp_path, task_files, "objective.reward_fn=column_addition", "rollout.samples_per_prompt=0")


def opd_trainer(out, files, policy):
    config = load_config(
        TINY_CONFIG,
        [
            f"output_dir={out}", "progress=false", "lock.enabled=false", "max_steps=2", "eval_steps=2",
            "save_steps=0", f"data.train_path={files['train']}", f"data.eval_path={files['validation']}",
            "rollout.max_new_tokens=6", f"rollout.policy={policy}",
        ],
    )  # fmt: skip
    return OPDTrainer.from_config(config)


def sample(trainer, prompt_ids, seed=123):
    sampler = trainer.rollout_policy.sampler(trainer.model, trainer.sampler)
    rollout = sampler.generate(prompt_ids, trainer.pad_token_id, trainer.eos_token_id, 6, 1.0, 1.0, seed=seed)
    return rollout.completion_ids.clone()


@pytest.mark.parametrize("policy", ["student", "initial_student", "teacher"])
def test_off_policy_rollouts_come_from_the_named_policy_not_the_trained_student(tmp_path, task_files, policy):
    trainer = opd_trainer(tmp_path, task_files, policy)
    prompt_ids = trainer.train_ids[:PROMPTS_PER_STEP]
    first = sample(trainer, prompt_ids)
    with torch.no_grad():  # the student trains far away from where it started
        for p in trainer.model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 2.0)
    again = sample(trainer, prompt_ids)
    assert torch.equal(first, again) == (policy != "student")
    if policy == "teacher":  # the teacher's own samples, not a copy of anything
        from lockedopd.opd.rollout import HFStudentSampler

        own = HFStudentSampler(trainer.teacher.model, seed_per_row=True).generate(
            prompt_ids, trainer.pad_token_id, trainer.eos_token_id, 6, 1.0, 1.0, seed=123
        )
        assert torch.equal(own.completion_ids, again)


def test_off_policy_opd_trains_on_the_other_policys_samples(tmp_path, task_files):
    trainer = opd_trainer(tmp_path, task_files, "teacher")
    before = trained_weights(trainer)
    trainer.train()
    assert largest_change(before, trainer) > 1e-4 and [r["step"] for r in read_metrics(tmp_path)][-1] == 2
    with pytest.raises(ValueError, match="rollout.policy=teacher does not work with teacher.backend=vllm"):
        load_config(TINY_CONFIG, [f"output_dir={tmp_path}", "rollout.policy=teacher", "teacher.backend=vllm"])
    with pytest.raises(ValueError, match="rollout.policy=initial_student does not work with rollout.backend=vllm"):
        load_config(TINY_CONFIG, [f"output_dir={tmp_path}", "rollout.policy=initial_student", "rollout.backend=vllm"])


@pytest.mark.parametrize(
    "mode",
    [
        ("rollout.policy=initial_student",),
        ("objective.name=rlvr", "objective.reward_fn=tests.test_training_modes:completion_length",
         "rollout.samples_per_prompt=2"),
    ],
    ids=["initial_student", "rlvr"],
)  # fmt: skip
def test_a_killed_off_policy_or_rlvr_run_resumes_to_the_same_weights(tmp_path, task_files, mode):
    # the frozen initial student is the run's W_0 again after a resume, not the checkpoint's weights
    settings = [f"data.train_path={task_files['train']}", f"data.eval_path={task_files['validation']}",
                "lock.enabled=false", "max_steps=4", "eval_steps=4", "save_steps=1", "rollout.max_new_tokens=6",
                *mode]  # fmt: skip
    run(tmp_path / "straight", *settings)
    run(tmp_path / "killed", *settings, kill_at=2)
    run(tmp_path / "killed", *settings, "resume=true")
    a, b = final_weights(tmp_path / "straight", step=4), final_weights(tmp_path / "killed", step=4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r.get("loss") for r in read_metrics(tmp_path / name)] for name in ("straight", "killed")]
    assert losses[0] == losses[1] and len(losses[0]) == 5  # step 0 (evaluation) and steps 1-4
