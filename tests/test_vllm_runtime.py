"""The shared vLLM plumbing: environment before import, the quiet start-up log and its verbose switch, engine args.

These run without vLLM: the engine is a stand-in that records its arguments and the environment it saw.
"""

from __future__ import annotations

import logging
import os
import types

import pytest

from lockedopd.runtime import vllm_runtime as runtime


@pytest.fixture()
def clean_env(monkeypatch):
    """No vLLM logging settings and no verbose switch; the ``vllm`` logger restored afterwards."""
    for key in ("VLLM_CONFIGURE_LOGGING", "VLLM_LOGGING_LEVEL", runtime.VERBOSE_ENV):
        monkeypatch.delenv(key, raising=False)
    vllm_logger = logging.getLogger("vllm")
    saved = (vllm_logger.level, vllm_logger.propagate, list(vllm_logger.handlers))
    yield monkeypatch
    vllm_logger.setLevel(saved[0])
    vllm_logger.propagate = saved[1]
    vllm_logger.handlers[:] = saved[2]


def _record(message: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("vllm.platforms.cpu", level, __file__, 1, message, None, None)


def test_known_startup_notices_are_dropped_and_other_warnings_kept():
    keep = runtime.KnownNoticeFilter()
    assert not keep.filter(_record("libtcmalloc is not found in LD_PRELOAD. For best performance, ..."))
    assert not keep.filter(_record("The global random seed is set to 0. Since VLLM_ENABLE_V1_MULTIPROCESSING ..."))
    assert keep.filter(_record("Not enough memory for the KV cache"))


def test_quiet_by_default_before_vllm_is_imported(clean_env):
    runtime.prepare_environment()
    assert os.environ["VLLM_CONFIGURE_LOGGING"] == "0"
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # the CPU defaults come with it
    vllm_logger = logging.getLogger("vllm")
    assert vllm_logger.level == logging.WARNING and not vllm_logger.propagate
    runtime.prepare_environment()  # idempotent: one handler
    assert sum(isinstance(h, runtime.QuietVLLMHandler) for h in vllm_logger.handlers) == 1


@pytest.mark.parametrize("switch", [(runtime.VERBOSE_ENV, "1"), ("VLLM_LOGGING_LEVEL", "DEBUG")])
def test_verbose_switch_or_own_vllm_settings_leave_vllm_logging_alone(clean_env, switch):
    clean_env.setenv(*switch)
    runtime.prepare_environment()
    assert "VLLM_CONFIGURE_LOGGING" not in os.environ


def test_cli_verbose_flag_turns_the_vllm_log_on(clean_env):
    from lockedopd.cli import build_parser

    assert build_parser().parse_args(["distill", "c.yaml", "-v"]).verbose
    assert build_parser().parse_args(["-v", "distill", "c.yaml"]).verbose
    assert not build_parser().parse_args(["distill", "c.yaml"]).verbose
    assert not runtime.verbose()
    runtime.set_verbose(True)
    assert runtime.verbose()


def test_start_llm_merges_fast_start_args_and_scopes_the_environment(clean_env):
    seen = {}

    class LLM:
        def __init__(self, **kwargs):
            seen.update(kwargs=kwargs, env=os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN"))

    clean_env.setattr(runtime, "import_vllm", lambda who: types.SimpleNamespace(LLM=LLM))
    clean_env.setattr(runtime, "forget_cached_vllm_env", lambda: None)
    clean_env.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    runtime.start_llm("Test", env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}, model="m", seed=3)
    assert seen["kwargs"] == {
        "enforce_eager": True,
        "distributed_executor_backend": "uni",
        "seed": 3,
        "use_tqdm_on_load": False,
        "model": "m",
    }
    assert seen["env"] == "1" and "VLLM_ALLOW_LONG_MAX_MODEL_LEN" not in os.environ
