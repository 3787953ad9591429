"""Teacher backends by name: what ``teacher.backend`` may say, how each backend is built and what it returns.

A backend is one builder function registered under a name::

    from lockedopd.teachers import TeacherBuildContext, register_teacher

    @register_teacher("my_backend", returns_full_logprobs=False)
    def build_my_teacher(context: TeacherBuildContext) -> TeacherScorer:
        return MyScorer(context.model_dir(), top_k_max=context.config.objective.top_k)

Once the module holding it is imported, ``teacher.backend=my_backend`` validates and builds. The built-in backends
(``hf``, ``vllm``, ``vllm_server``) are registered in :mod:`lockedopd.teachers.backends`. ``auto`` is not a
backend: it stands for ``vllm`` or ``hf``, decided when the run is built
(:func:`lockedopd.opd.builders.resolve_teacher_backend`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lockedopd.opd.values import AUTO_BACKEND
from lockedopd.registry import Registry
from lockedopd.teachers.base import TeacherScorer

#: The ``teacher.backend`` value that picks a registered backend when the run is built.


@dataclass(frozen=True)
class TeacherBuildContext:
    """What a backend's builder gets.

    Attributes:
        config: the run's :class:`lockedopd.OPDConfig` (``config.teacher`` is the teacher's section).
        tokenizer: the student's tokenizer (teacher and student share one vocabulary).
        build_model: builds ``config.teacher.model`` in this process and returns it.
        model_dir: returns a Hugging Face directory holding ``config.teacher.model``, for engines that load the
            weights themselves (raises ``ValueError`` for models that exist only in code).
    """

    config: Any
    tokenizer: Any
    build_model: Callable[[], nn.Module]
    model_dir: Callable[[], str]


TeacherBuilder = Callable[[TeacherBuildContext], TeacherScorer]


@dataclass(frozen=True)
class TeacherBackend:
    """A registered backend: its builder and what its scorers return.

    Attributes:
        name: the ``teacher.backend`` value.
        build: makes the scorer from a :class:`TeacherBuildContext`.
        full_logprobs: whether the scorer it builds for a given ``teacher`` config section returns full-vocabulary
            log-probs (its ``returns_full_logprobs``); configs are checked against it before anything is built.
    """

    name: str
    build: TeacherBuilder
    full_logprobs: bool | Callable[[Any], bool]

    def returns_full_logprobs(self, teacher_config: Any) -> bool:
        """Whether this backend, configured by ``teacher_config`` (a ``TeacherConfig``), returns full log-probs."""
        if callable(self.full_logprobs):
            return bool(self.full_logprobs(teacher_config))
        return bool(self.full_logprobs)


#: Every registered backend by name (filled by :func:`register_teacher`).
TEACHER_BACKENDS: Registry[TeacherBackend] = Registry(
    "teacher.backend", "register a new backend with lockedopd.teachers.register_teacher", (AUTO_BACKEND,)
)


def register_teacher(
    name: str, returns_full_logprobs: bool | Callable[[Any], bool], replace: bool = False
) -> Callable[[TeacherBuilder], TeacherBuilder]:
    """Decorator: register a builder as the teacher backend ``name``.

    Args:
        name: the ``teacher.backend`` value (not ``"auto"``).
        returns_full_logprobs: ``True``/``False``, or a function of the ``teacher`` config section saying it (for
            backends whose output depends on a setting, e.g. ``vllm`` with ``vllm_scoring``).
        replace: allow replacing an existing registration (otherwise a second registration is an error).
    """
    TEACHER_BACKENDS.check_new(name, replace)

    def decorator(build: TeacherBuilder) -> TeacherBuilder:
        TEACHER_BACKENDS.register(name, TeacherBackend(name, build, returns_full_logprobs), replace)
        return build

    return decorator


def teacher_backend(name: str) -> TeacherBackend:
    """The backend registered as ``name``; a ``ValueError`` naming the registered ones otherwise."""
    return TEACHER_BACKENDS.lookup(name)


def teacher_backend_choices() -> tuple[str, ...]:
    """The values ``teacher.backend`` accepts: the registered backends and ``"auto"``."""
    return TEACHER_BACKENDS.choices()
