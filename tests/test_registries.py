"""Extension points: a teacher backend and an objective registered from this file alone train a tiny run.

Also the registries' contracts: names are unique, unknown names list the registered ones, a backend must build what
it declares, every built-in scorer and sampler satisfies its protocol.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import pytest
import torch

from lockedopd.opd import OPDTrainer, load_config
from lockedopd.opd.objective_registry import (
    OBJECTIVES,
    SAMPLED_TOKEN,
    ObjectiveInputs,
    get_objective,
    register_objective,
)
from lockedopd.opd.objectives import masked_mean
from lockedopd.opd.rollout import HFStudentSampler, StudentSampler
from lockedopd.optim.full import FULL_OPTIMIZERS, FullOptimizer, register_full_optimizer
from lockedopd.teachers import (
    TEACHER_BACKENDS,
    HFTeacher,
    TeacherBuildContext,
    TeacherScorer,
    TeacherScores,
    VLLMHiddenStateTeacher,
    VLLMServerTeacher,
    VLLMTeacher,
    register_teacher,
    teacher_backend,
)
from tests.conftest import TINY_CONFIG

RUN = ["progress=false", "lock.enabled=false", "max_steps=3", "eval_steps=3", "save_steps=0"]


class UnigramTeacher:
    """A teacher that ignores the context: log π_T(v) is a fixed unigram distribution (sampled token only).

    It implements the :class:`TeacherScorer` protocol structurally (no base class), as an outside backend would.
    """

    returns_full_logprobs = False

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.logprobs = torch.log_softmax(torch.randn(vocab_size, generator=torch.Generator().manual_seed(seed)), -1)
        self.requests: list[dict] = []

    def score(
        self,
        sequences: Sequence[Sequence[int]],
        prompt_lengths: Sequence[int],
        top_k: int = 0,
        full_logprobs: bool = False,
    ) -> TeacherScores:
        """Log-probs of the completion tokens under the unigram distribution."""
        self.requests.append({"top_k": top_k, "full_logprobs": full_logprobs})
        if full_logprobs or top_k:
            raise ValueError("UnigramTeacher returns the sampled token's log-prob only.")
        width = max(len(s) - p for s, p in zip(sequences, prompt_lengths))
        token_logprobs, mask = torch.zeros(len(sequences), width), torch.zeros(len(sequences), width, dtype=torch.bool)
        for i, (seq, plen) in enumerate(zip(sequences, prompt_lengths)):
            completion = torch.tensor(list(seq[plen:]), dtype=torch.long)
            token_logprobs[i, : len(completion)] = self.logprobs[completion]
            mask[i, : len(completion)] = True
        return TeacherScores(token_logprobs, mask)


@pytest.fixture()
def unigram_backend():
    """``teacher.backend=unigram``, registered here and removed afterwards."""
    built: list[UnigramTeacher] = []

    @register_teacher("unigram", returns_full_logprobs=UnigramTeacher.returns_full_logprobs)
    def build_unigram_teacher(context: TeacherBuildContext) -> TeacherScorer:
        teacher = UnigramTeacher(len(context.tokenizer), seed=context.config.seed)
        built.append(teacher)
        return teacher

    yield built
    TEACHER_BACKENDS.pop("unigram")


@pytest.fixture()
def squared_gap_objective():
    """``objective.name=squared_gap``: mean (log π_S(y) − log π_T(y))², registered here and removed afterwards."""
    calls: list[ObjectiveInputs] = []

    @register_objective("squared_gap", needs=SAMPLED_TOKEN)
    def squared_gap(inputs: ObjectiveInputs) -> torch.Tensor:
        calls.append(inputs)
        gap = inputs.student_token_logprobs - inputs.teacher_token_logprobs
        return masked_mean(gap**2, inputs.mask)

    yield calls
    OBJECTIVES.pop("squared_gap")


def test_registered_backend_and_objective_train_a_tiny_run(tmp_path, unigram_backend, squared_gap_objective):
    config = load_config(
        TINY_CONFIG, [f"output_dir={tmp_path}", *RUN, "teacher.backend=unigram", "objective.name=squared_gap"]
    )
    trainer = OPDTrainer.from_config(config)
    assert trainer.teacher is unigram_backend[0]
    summary = trainer.train()

    assert len(squared_gap_objective) == 3  # one micro-batch per step
    # the teacher was asked for what the objective needs, and evaluation knows the KL is the sampled estimate
    assert unigram_backend[0].requests[0] == {"top_k": 0, "full_logprobs": False}
    assert summary["eval_kl_exact"] is False
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] >= 0 for r in records[1:])


def test_registered_backend_is_checked_against_what_objectives_need(tmp_path, unigram_backend):
    with pytest.raises(ValueError, match="objective.name='reverse_kl' needs the teacher's full-vocabulary"):
        load_config(TINY_CONFIG, [f"output_dir={tmp_path}", "teacher.backend=unigram", "objective.name=reverse_kl"])
    with pytest.raises(ValueError, match="teacher.temperature=2.0 needs the teacher's logits"):
        load_config(TINY_CONFIG, [f"output_dir={tmp_path}", "teacher.backend=unigram", "teacher.temperature=2.0"])


def test_backend_that_builds_something_else_than_it_declares_is_refused(tmp_path):
    @register_teacher("liar", returns_full_logprobs=True)
    def build_liar(context: TeacherBuildContext) -> TeacherScorer:
        return UnigramTeacher(len(context.tokenizer))

    try:
        config = load_config(TINY_CONFIG, [f"output_dir={tmp_path}", *RUN, "teacher.backend=liar"])
        with pytest.raises(TypeError, match="registered with returns_full_logprobs=True but built a UnigramTeacher"):
            OPDTrainer.from_config(config)
    finally:
        TEACHER_BACKENDS.pop("liar")


def test_names_are_unique_and_unknown_names_list_the_registered_ones():
    with pytest.raises(ValueError, match="already registered"):
        register_teacher("hf", returns_full_logprobs=True)
    with pytest.raises(ValueError, match="'auto' is reserved"):
        register_teacher("auto", returns_full_logprobs=True)
    with pytest.raises(ValueError, match="already registered"):
        register_objective("pg", needs=SAMPLED_TOKEN)
    with pytest.raises(ValueError, match="needs='logits' is not one of"):
        register_objective("new", needs="logits")
    with pytest.raises(ValueError, match=r"not one of \['hf', 'vllm', 'vllm_server', 'auto'\]"):
        teacher_backend("openai")
    with pytest.raises(ValueError, match=r"'grpo' is not one of \['sft', 'rlvr', 'pg', 'reverse_kl', 'topk_rev"):
        get_objective("grpo")


@pytest.mark.parametrize(
    ("backend", "scoring", "full"),
    [
        ("hf", "hidden_states", True),
        ("vllm", "hidden_states", True),
        ("vllm", "prompt_logprobs", False),
        ("vllm_server", "hidden_states", False),
    ],
)
def test_builtin_backends_declare_what_their_scorers_return(backend, scoring, full):
    overrides = [f"teacher.backend={backend}", f"teacher.vllm_scoring={scoring}", "objective.name=pg"]
    config = load_config(TINY_CONFIG, overrides)
    assert teacher_backend(backend).returns_full_logprobs(config.teacher) is full
    assert config.teacher.returns_full_logprobs() is full


def test_auto_backend_asks_the_vllm_entry_what_it_returns(tmp_path):
    """A temperature needs the teacher's logits: ``auto`` with prompt log-probs falls back to ``hf`` for it."""
    from lockedopd.opd.builders import resolve_teacher_backend

    overrides = [f"output_dir={tmp_path}", "teacher.backend=auto", "teacher.vllm_scoring=prompt_logprobs"]
    overrides += ["teacher.model.source=smollm2", "objective.name=pg", "teacher.temperature=2.0"]
    lines = []
    assert resolve_teacher_backend(load_config(TINY_CONFIG, overrides), lines.append) == "hf"
    assert len(lines) == 1 and "teacher.temperature=2.0 needs the teacher's logits" in lines[0]


def test_every_scorer_class_declares_full_logprobs_in_the_protocol(tiny_teacher_model):
    assert HFTeacher.returns_full_logprobs and VLLMHiddenStateTeacher.returns_full_logprobs
    assert not VLLMTeacher.returns_full_logprobs and not VLLMServerTeacher.returns_full_logprobs
    assert isinstance(HFTeacher(tiny_teacher_model), TeacherScorer)
    assert isinstance(UnigramTeacher(8), TeacherScorer)


def test_objectives_declare_what_they_need_from_the_teacher():
    needs = {name: objective.needs for name, objective in OBJECTIVES.items()}
    assert needs == {
        "sft": "none",  # trains on the data's completions: no teacher
        "rlvr": "reward",  # trains on its samples' verifiable rewards: no teacher
        "pg": "sampled_token",
        "reverse_kl": "full_logprobs",
        "topk_reverse_kl": "top_k",
        "forward_kl": "full_logprobs",
        "jsd": "full_logprobs",
    }
    assert get_objective("topk_reverse_kl").teacher_request(8) == {"top_k": 8, "full_logprobs": False}
    assert get_objective("jsd").teacher_request(8) == {"top_k": 0, "full_logprobs": True}
    assert not get_objective("sft").needs_teacher and get_objective("pg").needs_teacher
    assert not get_objective("rlvr").needs_teacher and get_objective("rlvr").samples_student
    assert not get_objective("sft").samples_student


def test_student_samplers_satisfy_the_protocol(tiny_student, tiny_tokenizer):
    from lockedopd.opd.vllm_rollout import VLLMStudentSampler

    assert issubclass(VLLMStudentSampler, StudentSampler)
    sampler = HFStudentSampler(tiny_student)
    assert isinstance(sampler, StudentSampler)
    pad, eos = tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id
    rollout = sampler.generate([[1, 2, 3], [4, 5]], pad, eos, 5, seed=0)
    assert rollout.completion_ids.shape[0] == 2 and rollout.prompt_lengths == [3, 2]
    with pytest.raises(ValueError, match="HFStudentSampler.generate: no prompts given"):
        sampler.generate([], pad, eos, 5)


@pytest.fixture()
def sgd_optimizer():
    """``optimizer=sgd_momentum``: torch's SGD with momentum, registered here (one call) and removed afterwards."""
    built: list[torch.optim.Optimizer] = []

    def build(config, params):
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9)
        built.append(optimizer)
        return optimizer

    register_full_optimizer(
        "sgd_momentum", FullOptimizer(build, "SGD with momentum", warms_up_a_lock="its state has no second moment")
    )
    yield built
    FULL_OPTIMIZERS.pop("sgd_momentum")


def test_a_registered_full_optimizer_trains_a_run_and_declares_what_it_supports(tmp_path, sgd_optimizer):
    config = load_config(TINY_CONFIG, [f"output_dir={tmp_path}", *RUN, "optimizer=sgd_momentum", "lr=0.05"])
    trainer = OPDTrainer.from_config(config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.optimizer is sgd_optimizer[0]
    # SGD with momentum keeps one buffer per trained tensor and nothing else: it (not AdamW) took the steps
    state = trainer.optimizer.state
    assert len(state) == len(before) and all(set(s) == {"momentum_buffer"} for s in state.values())
    moved = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert len(moved) == len(before)
    # what the entry declares is what the config checks: this one cannot warm up a lock, and says why
    with pytest.raises(ValueError, match="optimizer=sgd_momentum cannot warm up a lock: its state has no second"):
        load_config(TINY_CONFIG, [f"output_dir={tmp_path}", "optimizer=sgd_momentum", "lock.enabled=true"])
    with pytest.raises(ValueError, match=r"optimizer='nope' is not one of \[.*'sgd_momentum'"):
        load_config(TINY_CONFIG, [f"output_dir={tmp_path}", "optimizer=nope"])
