"""The one markdown table renderer of the benchmark reports, and the number formats their cells use.

``markdown_table(["a", "b", "c"], [["1", "2", "3"], ["x"]])`` gives::

    | a | b | c |
    |---|---|---|
    | 1 | 2 | 3 |
    | x | | |

A cell given as ``""`` is an empty value (``|  |``); a row shorter than the header is padded with empty columns
(``| |``), as for a method that did not run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def table_row(cells: Sequence[Any], columns: int | None = None) -> str:
    """One table line: ``| a | b |``, padded with empty columns up to ``columns``."""
    pad = 0 if columns is None else columns - len(cells)
    return "| " + " | ".join(str(c) for c in cells) + " |" + " |" * pad


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[Any]] = (), numbers_right: bool = False) -> list[str]:
    """A markdown table as lines: the header, its rule and the rows (see the module docstring); with
    ``numbers_right`` every column after the first is right-aligned (``---:``), for tables of numbers."""
    rule = "|---|" + "---:|" * (len(head) - 1) if numbers_right else "|" + "---|" * len(head)
    return [table_row(head), rule, *(table_row(row, len(head)) for row in rows)]


def fmt(value: Any, digits: int = 4) -> str:
    """A float with ``digits`` decimals, ``—`` for None, anything else as ``str``."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def interval(entry: dict[str, Any] | None, digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
    """``mean [low, high]`` of a :func:`~lockedopd.bench.stats.t_interval` entry, each times ``scale``; ``(n=1)``
    without an interval, ``—`` without a mean. ``unit`` follows the mean."""
    if not entry or entry.get("mean") is None:
        return "—"
    mean = f"{scale * entry['mean']:.{digits}f}{unit}"
    if entry.get("low") is None:
        return f"{mean} (n=1)"
    return f"{mean} [{scale * entry['low']:.{digits}f}, {scale * entry['high']:.{digits}f}]"


def percent(value: float | None) -> str:
    """A fraction as a percentage with one decimal (``—`` for None)."""
    return "—" if value is None else f"{100 * value:.1f}%"


def mean_std(entry: dict[str, Any] | None) -> str:
    """``mean ± std`` of a :func:`~lockedopd.bench.stats.spread` entry (the mean alone for one value; ``""`` for
    None)."""
    if entry is None:
        return ""
    return f"{entry['mean']:.3f}" + (f" ± {entry['std']:.3f}" if entry["std"] else "")


def mib(n_bytes: float) -> str:
    """Bytes as MiB with one decimal."""
    return f"{n_bytes / 2**20:.1f} MiB"
