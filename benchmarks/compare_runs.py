"""Plot the held-out reverse KL of several run directories in one figure.

Usage: ``python benchmarks/compare_runs.py OUT.png RUN_DIR:LABEL [RUN_DIR:LABEL ...]``
"""

from __future__ import annotations

import sys

from lockedopd.opd.plots import plot_run_comparison


def main(argv: list[str]) -> int:
    """Parse ``RUN_DIR:LABEL`` pairs and write the plot."""
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, pairs = argv[0], [a.rsplit(":", 1) if ":" in a else (a, a) for a in argv[1:]]
    print(plot_run_comparison([p[0] for p in pairs], [p[1] for p in pairs], out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
