"""Teacher scorers: one protocol, in-process and vLLM-backed implementations.

The vLLM modules import without vLLM installed; they import it when a scorer is created.
"""

from lockedopd.teachers.base import ScorerBase, TeacherScorer, TeacherScores
from lockedopd.teachers.hf import HFTeacher
from lockedopd.teachers.vllm_engine import VLLMTeacher
from lockedopd.teachers.vllm_hidden import VLLMHiddenStateTeacher
from lockedopd.teachers.vllm_server import VLLMServerError, VLLMServerTeacher, VLLMServerUnavailable

__all__ = [
    "HFTeacher",
    "ScorerBase",
    "TeacherScorer",
    "TeacherScores",
    "VLLMServerError",
    "VLLMServerTeacher",
    "VLLMServerUnavailable",
    "VLLMHiddenStateTeacher",
    "VLLMTeacher",
]
