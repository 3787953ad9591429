"""The benchmark harness behind ``lockedopd bench``: the quality grid (:mod:`lockedopd.bench.quality`) with its
statistics, reports and the archive a grid keeps its finished cells in, and the memory / speed comparison of the
training methods side by side (:mod:`lockedopd.bench.memory`). Nothing here is imported by ``import lockedopd``."""
