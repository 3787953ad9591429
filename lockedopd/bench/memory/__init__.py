"""Memory and speed of the training methods, side by side (``benchmarks/memory_speed.py``, ``lockedopd bench``).

``config`` loads an experiment, ``methods`` builds each method from the library's registries, ``measure`` measures
one method, ``workers`` isolates it in a process, ``plan`` and ``report`` compare and render, ``plot`` draws;
``runner`` ties them together (:func:`main`).
"""

from lockedopd.bench.memory.config import load_config
from lockedopd.bench.memory.measure import measure_method
from lockedopd.bench.memory.methods import METHOD_SPECS, MethodSpec, method_spec, setup_method
from lockedopd.bench.memory.plan import PLAN_KEYS, planned_bytes
from lockedopd.bench.memory.report import markdown_report
from lockedopd.bench.memory.runner import main, run

__all__ = [
    "METHOD_SPECS",
    "PLAN_KEYS",
    "MethodSpec",
    "load_config",
    "main",
    "markdown_report",
    "measure_method",
    "method_spec",
    "planned_bytes",
    "run",
    "setup_method",
]
