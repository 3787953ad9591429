"""Memory and speed of OPD training methods, side by side in one run, on one student and one fixed batch.

    python benchmarks/memory_speed.py benchmarks/experiments/smollm2.yaml [--out DIR] [--methods full,lora]

The benchmark lives in :mod:`lockedopd.bench.memory` (``--help`` describes the methods and what is measured);
this script runs it (settings: ``lockedopd/bench/memory/defaults.yaml``) and writes to ``results/<experiment>/`` here.
"""

import sys
from pathlib import Path

from lockedopd.bench.memory import main

if __name__ == "__main__":
    sys.exit(main(bench_dir=Path(__file__).resolve().parent))
