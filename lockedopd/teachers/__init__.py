"""Teacher scorers: one protocol, in-process and vLLM-backed implementations."""

from lockedopd.teachers.base import TeacherScorer, TeacherScores
from lockedopd.teachers.hf import HFTeacher

__all__ = ["HFTeacher", "TeacherScorer", "TeacherScores"]
