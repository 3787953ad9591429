"""lockedopd.bench.memory: methods built from the registries, the committed report re-rendered, the modules' size.

Everything here runs in this process (no worker processes; the end-to-end run is tests/test_benchmarks.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from lockedopd.bench.memory import markdown_report
from lockedopd.bench.memory.report import markdown_table

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
PACKAGE = REPO / "lockedopd" / "bench" / "memory"


def test_markdown_table():
    table = markdown_table(["method", "bytes", "s"], [["a", "1", "2"], ["b", "3", "4"]])
    assert table == "| method | bytes | s |\n|---|---:|---:|\n| a | 1 | 2 |\n| b | 3 | 4 |"


def test_committed_results_render_unchanged():
    """markdown_report of each committed memory/speed results.json is byte-identical to its results.md."""
    committed = [
        d
        for d in sorted((BENCH / "results").iterdir())
        if (d / "results.md").is_file() and (d / "results.md").read_text().startswith("# Memory and speed of OPD")
    ]
    assert committed, "no committed memory/speed results"
    for directory in committed:
        report = json.loads((directory / "results.json").read_text())
        assert markdown_report(report) == (directory / "results.md").read_text(), directory.name


def test_the_script_is_thin_and_the_modules_are_small():
    assert len((BENCH / "memory_speed.py").read_text().splitlines()) <= 300
    sizes = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert len(sizes) >= 5 and max(sizes.values()) <= 300, sizes
