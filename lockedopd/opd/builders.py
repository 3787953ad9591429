"""Build what a config names: tokenizer, student, teacher scorer and prompt sets.

Everything is checked here, before a run directory is created, so bad input leaves nothing half-written.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from lockedopd.data import (
    PromptFields,
    PromptRecord,
    load_records,
    split_prompts,
    synthetic_prompts,
)
from lockedopd.models import build_tiny_llama, build_tiny_tokenizer, layers_to_keep, load_smollm2, prune_layers
from lockedopd.opd.built_models import is_built_source, resolve_built_source
from lockedopd.opd.config import ModelConfig, OPDConfig
from lockedopd.opd.objective_registry import get_objective
from lockedopd.runtime.devices import resolve_device
from lockedopd.runtime.hub import is_hub_id, resolve_hub_model
from lockedopd.runtime.vllm_runtime import vllm_unavailable_reason
from lockedopd.teachers.base import TeacherScorer
from lockedopd.teachers.registry import AUTO_BACKEND, TeacherBuildContext, teacher_backend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class RunInputs:
    """Everything :class:`lockedopd.OPDTrainer` consumes, built from a config."""

    student: nn.Module
    tokenizer: object
    teacher: TeacherScorer | None
    train_prompts: Sequence[PromptRecord]
    eval_prompts: Sequence[PromptRecord]
    eval_teacher: TeacherScorer | None = None
    accuracy_problems: list[PromptRecord] | None = None


def model_directory(spec: ModelConfig) -> Path:
    """The local directory a model ``source`` names: a checkpoint directory, a built recipe's cached model, or a
    hub id's snapshot (:mod:`lockedopd.runtime.hub`)."""
    if is_built_source(spec.source):
        return resolve_built_source(spec.source)
    path = Path(spec.source)
    if path.is_dir():
        return path
    if is_hub_id(spec.source):
        return resolve_hub_model(spec.source, spec.revision)
    raise FileNotFoundError(
        f"model source {spec.source!r} is neither 'tiny', 'smollm2', a built:RECIPE, an existing checkpoint "
        "directory nor a hub id (owner/name)."
    )


def build_model(spec: ModelConfig, tokenizer=None) -> tuple[nn.Module, object]:
    """Model (and its tokenizer) for one :class:`ModelConfig`, pruned if asked."""
    dtype = DTYPES[spec.dtype]
    if spec.source == "tiny":
        tokenizer = tokenizer or build_tiny_tokenizer()
        model = build_tiny_llama(
            len(tokenizer),
            spec.num_layers,
            spec.hidden_size,
            spec.intermediate_size,
            spec.num_heads,
            seed=spec.seed,
            tokenizer=tokenizer,
            init_std=spec.init_std,
        )
    elif spec.source == "smollm2":
        model, tokenizer = load_smollm2(dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path, remote = model_directory(spec), {"trust_remote_code": spec.trust_remote_code}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **remote)
        tokenizer = AutoTokenizer.from_pretrained(path, **remote)
    if spec.keep_layers is not None:
        prune_layers(model, spec.keep_layers)
    elif spec.drop_every is not None:
        prune_layers(model, layers_to_keep(model.config.num_hidden_layers, spec.drop_every))
    return model.to(dtype), tokenizer


def resolve_teacher_backend(config: OPDConfig, notify: Callable[[str], None] | None = None) -> str:
    """The backend ``teacher.backend`` stands for: ``"auto"`` becomes ``"vllm"`` or, with a notice, ``"hf"``.

    ``auto`` picks the vLLM engine when vLLM imports and the teacher is a model directory vLLM can load (and, with
    ``vllm_scoring=prompt_logprobs``, the objective needs only top-k log-probs and the teacher temperature is 1);
    otherwise it falls back to the in-process HF teacher and calls ``notify`` (default: print to stderr) with one
    line saying why.
    """
    backend = config.teacher.backend
    if backend != AUTO_BACKEND:
        return backend
    notify = notify or (lambda line: print(line, file=sys.stderr, flush=True))
    vllm_full = teacher_backend("vllm").returns_full_logprobs(config.teacher)
    if get_objective(config.objective.name).needs_full_logprobs and not vllm_full:
        reason = f"objective {config.objective.name} needs full-vocabulary log-probs, which vLLM prompt log-probs lack"
    elif config.teacher.temperature != 1.0 and not vllm_full:
        temperature = config.teacher.temperature
        reason = f"teacher.temperature={temperature} needs the teacher's logits, which vLLM prompt log-probs lack"
    elif config.teacher.model.source == "tiny" or config.teacher.model.drop_every or config.teacher.model.keep_layers:
        reason = "the teacher is built in code (tiny or pruned), and vLLM loads a model directory"
    else:
        reason = vllm_unavailable_reason()
    if reason is None:
        return "vllm"
    notify(f"lockedopd: teacher.backend=auto scores with HFTeacher: {reason}.")
    return "hf"


def build_teacher(config: OPDConfig, tokenizer, backend: str | None = None) -> TeacherScorer:
    """The teacher scorer of the registered backend ``backend`` (default: ``config.teacher.backend`` resolved).

    Raises ``TypeError`` if the backend builds something that is not a :class:`TeacherScorer` or that returns
    other log-probs than it was registered with.
    """
    entry = teacher_backend(backend or resolve_teacher_backend(config))
    spec = config.teacher.model
    context = TeacherBuildContext(
        config=config,
        tokenizer=tokenizer,
        build_model=lambda: build_model(spec, tokenizer if spec.source == "tiny" else None)[0].to(
            resolve_device(config.device)
        ),
        model_dir=lambda: _teacher_dir(config),
    )
    teacher = entry.build(context)
    if not isinstance(teacher, TeacherScorer):
        raise TypeError(
            f"teacher backend {entry.name!r} built a {type(teacher).__name__}, which lacks the TeacherScorer "
            "protocol (vocab_size, returns_full_logprobs, score); give it those members."
        )
    declared = entry.returns_full_logprobs(config.teacher)
    if bool(teacher.returns_full_logprobs) != declared:
        raise TypeError(
            f"teacher backend {entry.name!r} is registered with returns_full_logprobs={declared} but built a "
            f"{type(teacher).__name__} with returns_full_logprobs={teacher.returns_full_logprobs}; make the "
            "registration say what the scorer returns."
        )
    return teacher


def _teacher_dir(config: OPDConfig) -> str:
    """A HF directory for engines that load weights themselves (vLLM)."""
    spec = config.teacher.model
    if spec.source == "smollm2":
        from lockedopd.models import default_cache_dir

        load_smollm2()  # makes sure the converted cache exists
        return str(default_cache_dir() / "smollm2-135m-instruct")
    if spec.source == "tiny" or spec.drop_every or spec.keep_layers:
        raise ValueError("the vLLM teacher needs teacher.model.source to be 'smollm2' or a checkpoint directory.")
    return str(model_directory(spec))


def prompt_fields(config: OPDConfig) -> PromptFields:
    """The columns ``data.*_field`` name."""
    d = config.data
    return PromptFields(prompt=d.prompt_field, answer=d.answer_field, completion=d.completion_field)


def load_eval_records(config: OPDConfig, source: str) -> Sequence[PromptRecord]:
    """Held-out records of ``source`` (``data.eval_split`` of a ``datasets`` source)."""
    return load_records(source, prompt_fields(config), config.data.eval_split, config.data.subset)


def build_prompts(config: OPDConfig) -> tuple[Sequence[PromptRecord], Sequence[PromptRecord]]:
    """Train and held-out prompt sets."""
    data = config.data
    if data.train_path is None:
        if config.student.source != "tiny":
            raise ValueError("data.train_path is required unless the student is a tiny model.")
        records = synthetic_prompts(64 + data.eval_size, seed=config.seed)
    else:
        records = load_records(data.train_path, prompt_fields(config), data.split, data.subset)
    if data.eval_path is not None:
        train, held_out = records, load_eval_records(config, data.eval_path)[: data.eval_size]
    else:
        train, held_out = split_prompts(records, data.eval_size, seed=config.seed)
    if not train:
        raise ValueError("no training prompts left after holding out the eval set.")
    return train, held_out


def check_vocabularies(student: nn.Module, tokenizer, teacher: TeacherScorer) -> None:
    """Raise ``ValueError`` if teacher and student cannot be compared token by token."""
    student_vocab = student.get_output_embeddings().weight.shape[0]
    teacher_vocab = getattr(teacher, "vocab_size", None)
    if teacher_vocab is not None and teacher_vocab != student_vocab:
        raise ValueError(
            f"teacher vocabulary size ({teacher_vocab}) differs from the student's ({student_vocab}): on-policy "
            "distillation compares log-probs token by token, so teacher and student must share one tokenizer. "
            "Pick a teacher of the student's model family."
        )
    if len(tokenizer) > student_vocab:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the student's output layer only {student_vocab}; "
            "resize the student's embeddings or use the matching tokenizer."
        )


SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def check_tokenizers_match(student_tokenizer, teacher_tokenizer) -> None:
    """Raise ``ValueError`` naming what differs when teacher and student do not tokenize alike: on-policy
    distillation hands the teacher the student's token ids, so both must map every token (and every special
    token) to the same id."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        only_student = sorted(set(student_vocab) - set(teacher_vocab))[:3]
        only_teacher = sorted(set(teacher_vocab) - set(student_vocab))[:3]
        moved = sorted(t for t in set(student_vocab) & set(teacher_vocab) if student_vocab[t] != teacher_vocab[t])[:3]
        raise ValueError(
            f"teacher and student tokenizers differ ({len(student_vocab)} vs {len(teacher_vocab)} tokens; only the "
            f"student's: {only_student}, only the teacher's: {only_teacher}, other ids: {moved}); on-policy "
            "distillation scores the student's token ids, so pick a teacher of the student's model family."
        )
    for name in SPECIAL_TOKENS:
        ours, theirs = getattr(student_tokenizer, name, None), getattr(teacher_tokenizer, name, None)
        if ours is not None and theirs is not None and ours != theirs:
            raise ValueError(
                f"teacher and student tokenizers share a vocabulary but not their {name} ({ours!r} vs {theirs!r}); "
                "completions would end differently for the two: use the student's tokenizer files for the teacher."
            )


def teacher_tokenizer(config: OPDConfig):
    """The tokenizer that ships with the teacher (``None`` where the teacher has none of its own: tiny, smollm2)."""
    if config.teacher.model.source in ("tiny", "smollm2"):
        return None
    from transformers import AutoTokenizer

    spec = config.teacher.model
    return AutoTokenizer.from_pretrained(model_directory(spec), trust_remote_code=spec.trust_remote_code)


def build_accuracy_problems(config: OPDConfig) -> list[PromptRecord] | None:
    """The problems ``accuracy`` scores (the first ``accuracy.size`` of ``accuracy.path`` or ``data.eval_path``),
    with the verifier checked; ``None`` when ``accuracy.verifier`` is unset."""
    from lockedopd.tasks.rewards import resolve_reward_fn

    acc = config.accuracy
    if acc.verifier is None:
        return None
    resolve_reward_fn(acc.verifier)  # a bad name fails here, before anything is written
    path = acc.path or config.data.eval_path
    d = config.data
    fields = PromptFields(acc.prompt_field or d.prompt_field, acc.answer_field or d.answer_field, d.completion_field)
    records = load_records(path, fields, acc.split or d.eval_split, acc.subset or d.subset)
    problems = list(islice((r for r in records if r.answer is not None), acc.size))
    if not problems:
        raise ValueError(f'accuracy: {path} has no record with an "answer"; accuracy needs reference answers.')
    return problems


def build_run_inputs(config: OPDConfig) -> RunInputs:
    """Build and cross-check every input of a run (no teacher for objectives that need none, e.g. ``sft``)."""
    train, held_out = build_prompts(config)
    accuracy_problems = build_accuracy_problems(config)
    student, tokenizer = build_model(config.student)
    if not get_objective(config.objective.name).needs_teacher:  # given completions are checked by the trainer
        return RunInputs(student, tokenizer, None, train, held_out, accuracy_problems=accuracy_problems)
    own = teacher_tokenizer(config)
    if own is not None:  # before the teacher is loaded: a mismatch fails fast, naming what differs
        check_tokenizers_match(tokenizer, own)
    backend = resolve_teacher_backend(config)
    teacher = build_teacher(config, tokenizer, backend)
    check_vocabularies(student, tokenizer, teacher)
    eval_teacher = None
    if config.teacher.eval_backend is not None and config.teacher.eval_backend != backend:
        eval_teacher = build_teacher(config, tokenizer, config.teacher.eval_backend)
        check_vocabularies(student, tokenizer, eval_teacher)
    return RunInputs(student, tokenizer, teacher, train, held_out, eval_teacher, accuracy_problems)
