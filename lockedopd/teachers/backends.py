"""The built-in teacher backends: ``hf`` (in-process transformers), ``vllm`` (in-process engine), ``vllm_server``.

What each returns is read from its scorer class's ``returns_full_logprobs`` (the :class:`TeacherScorer` protocol).
"""

from __future__ import annotations

from typing import Any

from lockedopd.teachers.base import TeacherScorer
from lockedopd.teachers.hf import HFTeacher
from lockedopd.teachers.registry import TeacherBuildContext, register_teacher
from lockedopd.teachers.vllm_engine import VLLMTeacher
from lockedopd.teachers.vllm_hidden import VLLMHiddenStateTeacher
from lockedopd.teachers.vllm_server import VLLMServerTeacher


@register_teacher("hf", returns_full_logprobs=HFTeacher.returns_full_logprobs)
def build_hf_teacher(context: TeacherBuildContext) -> TeacherScorer:
    """:class:`HFTeacher` on the teacher model built in this process."""
    spec = context.config.teacher
    return HFTeacher(
        context.build_model(),
        batch_size=spec.batch_size,
        temperature=spec.temperature,
        keep_hidden_states=context.config.objective.chunk_size > 0,
    )


def vllm_scorer_class(teacher_config: Any) -> type[VLLMHiddenStateTeacher] | type[VLLMTeacher]:
    """The engine scorer ``teacher.vllm_scoring`` picks: hidden states (exact) or prompt log-probs (top-k)."""
    return VLLMHiddenStateTeacher if teacher_config.vllm_scoring == "hidden_states" else VLLMTeacher


@register_teacher("vllm", returns_full_logprobs=lambda teacher: vllm_scorer_class(teacher).returns_full_logprobs)
def build_vllm_teacher(context: TeacherBuildContext) -> TeacherScorer:
    """The in-process vLLM engine scorer that ``teacher.vllm_scoring`` picks."""
    config = context.config
    if vllm_scorer_class(config.teacher) is VLLMHiddenStateTeacher:
        return VLLMHiddenStateTeacher(
            context.model_dir(),
            temperature=config.teacher.temperature,
            keep_hidden_states=config.objective.chunk_size > 0,
        )
    return VLLMTeacher(context.model_dir(), top_k_max=max(config.objective.top_k, 1))


@register_teacher("vllm_server", returns_full_logprobs=VLLMServerTeacher.returns_full_logprobs)
def build_vllm_server_teacher(context: TeacherBuildContext) -> TeacherScorer:
    """A client of the vLLM OpenAI server at ``teacher.server_url`` (sampled token and top-k log-probs)."""
    return VLLMServerTeacher(base_url=context.config.teacher.server_url, expected_vocab_size=len(context.tokenizer))
