"""Teacher scorers: one protocol, in-process and vLLM-backed implementations, and the backend registry.

The vLLM modules import without vLLM installed; they import it when a scorer is created.
"""

from lockedopd.teachers import backends  # noqa: F401 - registers the built-in backends
from lockedopd.teachers.base import ScorerBase, TeacherScorer, TeacherScores
from lockedopd.teachers.hf import HFTeacher
from lockedopd.teachers.registry import (
    TEACHER_BACKENDS,
    TeacherBackend,
    TeacherBuildContext,
    register_teacher,
    teacher_backend,
)
from lockedopd.teachers.vllm_engine import VLLMTeacher
from lockedopd.teachers.vllm_hidden import VLLMHiddenStateTeacher
from lockedopd.teachers.vllm_server import VLLMServerError, VLLMServerTeacher, VLLMServerUnavailable

__all__ = [
    "TEACHER_BACKENDS",
    "HFTeacher",
    "ScorerBase",
    "TeacherBackend",
    "TeacherBuildContext",
    "TeacherScorer",
    "TeacherScores",
    "VLLMHiddenStateTeacher",
    "VLLMServerError",
    "VLLMServerTeacher",
    "VLLMServerUnavailable",
    "VLLMTeacher",
    "register_teacher",
    "teacher_backend",
]
