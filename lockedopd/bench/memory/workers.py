"""Each method in its own process, so that its peak RSS is its own: fork (default), spawn, or in-process (none)."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_lib
import traceback
from typing import Any

from lockedopd.bench.memory.measure import measure_method
from lockedopd.bench.memory.methods import SkipMethod, method_spec

__all__ = ["preload_modules", "run_method", "worker"]


def preload_modules() -> None:
    """Import what the workers need once, so that forked workers start in milliseconds.

    Imports only: a process that has run torch's parallel kernels must not fork (OpenMP then hangs the child).
    """
    import peft  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    import lockedopd.adapter  # noqa: F401
    import lockedopd.lock.methods  # noqa: F401
    import lockedopd.models  # noqa: F401
    import lockedopd.opd.objectives  # noqa: F401
    import lockedopd.opd.rollout  # noqa: F401
    import lockedopd.optim  # noqa: F401
    import lockedopd.optim.full  # noqa: F401
    import lockedopd.subspace  # noqa: F401


def _set_lean_malloc(config: dict) -> None:
    from lockedopd.runtime.host_allocator import set_malloc_mmap_threshold

    if config["isolation"] == "none":
        raise SkipMethod("glibc's mmap threshold cannot be undone in-process: run *_mmap methods with fork/spawn")
    if not set_malloc_mmap_threshold(config["malloc_mmap_threshold"]):
        raise SkipMethod("the C library is not glibc: no mmap threshold to set")


def worker(method: str, config: dict, queue: Any) -> None:
    """Measure ``method`` and put ``("ok", record)``, ``("skipped", reason)`` or ``("error", traceback)`` on
    ``queue``."""
    try:
        if method_spec(method).lean_malloc:
            _set_lean_malloc(config)
        queue.put(("ok", measure_method(method, config)))
    except SkipMethod as exc:
        queue.put(("skipped", str(exc)))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put(("error", traceback.format_exc()))


class _ListQueue:
    """The queue of an in-process run."""

    def __init__(self) -> None:
        self.items: list = []

    def put(self, item: Any) -> None:
        """Keep ``item``."""
        self.items.append(item)


def run_method(method: str, config: dict) -> tuple[str, Any]:
    """Measure one method in a fresh process (or in this one for ``isolation: none``); returns what
    :func:`worker` reported."""
    if config["isolation"] == "none":
        inline = _ListQueue()
        worker(method, config, inline)
        return inline.items[0]
    ctx = mp.get_context(config["isolation"])
    results = ctx.Queue()
    proc = ctx.Process(target=worker, args=(method, config, results), name=f"bench-{method}")
    proc.start()
    try:
        while True:
            try:
                return results.get(timeout=5.0)
            except queue_lib.Empty:
                if not proc.is_alive():
                    return "error", f"worker for {method} exited with code {proc.exitcode} without a result"
    finally:
        proc.join(timeout=60)
