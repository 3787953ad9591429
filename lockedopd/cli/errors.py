"""The command line's one error boundary: every failure is one line (two with a note) and exit status 2.

Expected errors — bad input, a missing file, an unreachable server, a stopped run — print their message, which
names the problem and the fix. Anything else prints its type and message and says that ``--debug`` shows the
traceback. ``--debug`` (or ``LOCKEDOPD_DEBUG=1``) prints the traceback of every failure first.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,  # FileNotFoundError, FileExistsError, PermissionError, ConnectionError, ...
    ImportError,
    FloatingPointError,
)
"""Errors whose message is written for the user; others are reported with their type as unexpected."""


def debug_enabled(args: Any = None) -> bool:
    """Whether tracebacks are wanted: ``--debug`` on the command line or ``LOCKEDOPD_DEBUG=1``."""
    return bool(getattr(args, "debug", False)) or os.environ.get("LOCKEDOPD_DEBUG", "") not in ("", "0")


def one_line(text: str) -> str:
    """``text`` with its whitespace (newlines included) collapsed, for a one-line message."""
    return " ".join(str(text).split())


def report_failure(command: str, exc: BaseException, debug: bool = False) -> int:
    """Print ``exc`` as ``lockedopd COMMAND: error: ...`` (plus its notes) on stderr; return the exit status."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    message = one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, KeyError):
        message = f"missing key {message}"
    if not isinstance(exc, EXPECTED_ERRORS) or type(exc) in (OSError, RuntimeError):
        message = f"{type(exc).__name__}: {message}"
    if not isinstance(exc, EXPECTED_ERRORS) and not debug:
        message += " (an unexpected error: rerun with --debug for the traceback)"
    print(f"lockedopd {command}: error: {message}", file=sys.stderr)
    for note in getattr(exc, "__notes__", ()):  # e.g. where a stopped run's last checkpoint is
        print(f"lockedopd {command}: {one_line(note)}", file=sys.stderr)
    return EXIT_ERROR


def run_guarded(command: str, handler: Callable[[Any], int | None], args: Any) -> int:
    """Run ``handler(args)`` inside the error boundary; returns the exit status (0, 2 or 130)."""
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        print(f"lockedopd {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the boundary: one clean line, the traceback only with --debug
        return report_failure(command, exc, debug_enabled(args))
