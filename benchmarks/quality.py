"""The quality grid from a source checkout: ``python benchmarks/quality.py EXPERIMENT.yaml [...]`` is
``lockedopd bench quality EXPERIMENT.yaml [...]``; the harness is :mod:`lockedopd.bench.quality`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lockedopd, installed or not
from lockedopd.bench.quality import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
